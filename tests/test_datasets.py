"""The asset registry: real URLs and checksums, and the verified fetch path against a local server."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import subprocess
import threading
from functools import partial

import numpy as np
import pytest

import scbert_tl as scbert
from scbert_tl.datasets import Asset, IntegrityError, fetch, git_blob_sha1, read_gene2vec


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path):
    old = scbert.settings._cachedir
    scbert.settings.cachedir = tmp_path / "cache"
    yield tmp_path / "cache"
    scbert.settings.cachedir = old


def test_registry_has_the_assets_at_real_urls():
    reg = scbert.datasets.REGISTRY
    assert reg["scbert-panglao-genes"].sha256 == "d8934d4b178a4f40bf2675fcd61bf600c87aeaa52dfe488487edde644cba0841"
    assert reg["gene2vec-200"].git_sha1 == "809134889e79b99eba0d5b3f46cdb987367ecbc9"
    assert reg["scbert-panglao-weights"].git_sha1 == "7febf0283b13dd0605f10442e0586891605d3801"
    for name in ("scbert-panglao-genes", "gene2vec-200", "scbert-panglao-weights"):
        assert reg[name].url.startswith("https://raw.githubusercontent.com/")
    hgnc = reg["hgnc-complete-set"]  # a dated HGNC release: no published checksum, pinned at first download
    assert hgnc.url.startswith("https://ftp.ebi.ac.uk/pub/databases/genenames/hgnc/archive/") and hgnc.pin
    for asset in reg.values():
        assert asset.sha256 or asset.git_sha1 or asset.pin


def test_pinned_asset_is_checked_after_first_download(server, cache):
    www, url = server
    (www / "nomenclature.txt").write_bytes(b"hgnc_id\tsymbol\n")
    asset = Asset(name="nom", url=f"{url}/nomenclature.txt", pin=True)
    path = fetch(asset, progressbar=False)
    assert (cache / "nom.sha256").read_text().strip() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert fetch(asset, progressbar=False) == path  # unchanged: accepted
    path.write_bytes(b"hgnc_id\tsym")  # truncated in the cache
    with pytest.raises(IntegrityError, match="pinned at its first download"):
        fetch(asset, progressbar=False)
    assert not path.exists() and not (cache / "nom.sha256").exists()


def test_hgnc_table_that_is_not_one_is_refused_and_removed(server, cache, monkeypatch):
    www, url = server
    (www / "hgnc.txt").write_text("<html>Service unavailable</html>\n")
    monkeypatch.setitem(
        scbert.datasets.REGISTRY, "hgnc-complete-set", Asset(name="hgnc-complete-set", url=f"{url}/hgnc.txt", pin=True)
    )
    with pytest.raises(ValueError, match="not an HGNC complete-set table"):
        scbert.datasets.hgnc_table()
    assert not (cache / "hgnc-complete-set").exists()


def test_unverified_assets_are_not_allowed():
    with pytest.raises(ValueError, match="needs a sha256 or a git_sha1"):
        Asset(name="x", url="http://127.0.0.1/x")


def test_git_blob_sha1_matches_git(tmp_path):
    f = tmp_path / "f.txt"
    f.write_bytes(b"ACTB\t0.1 0.2\n" * 100)
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    expected = subprocess.run(["git", "hash-object", str(f)], capture_output=True, text=True, check=True).stdout.strip()
    assert git_blob_sha1(f) == expected


def test_fetch_sha256_from_local_server(server, cache):
    www, url = server
    payload = b"GENE1\nGENE2\n"
    (www / "panel.txt").write_bytes(payload)
    asset = Asset(name="panel", url=f"{url}/panel.txt", sha256=hashlib.sha256(payload).hexdigest())
    path = fetch(asset, progressbar=False)
    assert path == cache / "panel" and path.read_bytes() == payload
    (www / "panel.txt").unlink()  # a second fetch is served from the cache
    assert fetch(asset, progressbar=False).read_bytes() == payload


def test_fetch_git_sha1_from_local_server(server, cache):
    www, url = server
    (www / "w.bin").write_bytes(b"\x00\x01weights")
    asset = Asset(name="w", url=f"{url}/w.bin", git_sha1=git_blob_sha1(www / "w.bin"))
    assert fetch(asset, progressbar=False).read_bytes() == b"\x00\x01weights"


@pytest.mark.parametrize("kind", ["sha256", "git_sha1"])
def test_corrupt_download_is_refused_and_not_cached(server, cache, kind):
    www, url = server
    good = b"the real file\n"
    reference = www / "ref"
    reference.write_bytes(good)
    checksum = hashlib.sha256(good).hexdigest() if kind == "sha256" else git_blob_sha1(reference)
    (www / "file").write_bytes(good[:-3])  # truncated on the server
    asset = Asset(name="file", url=f"{url}/file", **{kind: checksum})
    with pytest.raises(IntegrityError, match="file"):
        fetch(asset, progressbar=False)
    assert not (cache / "file").exists()
    (www / "file").write_bytes(good)  # fixed upstream: the next fetch succeeds
    assert fetch(asset, progressbar=False).read_bytes() == good


def test_corrupted_cached_copy_is_replaced_or_refused(server, cache):
    www, url = server
    good = b"abc" * 10
    (www / "a").write_bytes(good)
    asset = Asset(name="a", url=f"{url}/a", git_sha1=git_blob_sha1(www / "a"))
    path = fetch(asset, progressbar=False)
    path.write_bytes(b"tampered")
    (www / "a").unlink()
    with pytest.raises(IntegrityError, match="deleted from the cache"):
        fetch(asset, progressbar=False)
    assert not path.exists()


def test_unknown_asset_name():
    with pytest.raises(KeyError, match="Unknown asset 'nope'"):
        fetch("nope")


def test_cachedir_follows_environment(monkeypatch, tmp_path):
    settings = scbert._settings.ScBERTSettings()
    monkeypatch.setenv("SCBERT_DATA_DIR", str(tmp_path / "here"))
    assert settings.cachedir == tmp_path / "here"


def test_panel_genes_from_cache(panel_genes):
    genes = scbert.datasets.panel_genes("scbert-panglao")
    assert genes == panel_genes and len(genes) == 16906 and genes[-1] != "ZZZ3"


def test_read_gene2vec_aligns_to_panel(tmp_path):
    f = tmp_path / "g2v.txt"
    f.write_text("B\t1 2 3\nZ\t9 9 9\nA\t4 5 6\n")
    matrix, coverage = read_gene2vec(f, ["A", "B", "C"])
    np.testing.assert_array_equal(matrix, [[4, 5, 6], [1, 2, 3], [0, 0, 0], [0, 0, 0]])
    assert coverage == pytest.approx(2 / 3)


def test_read_gene2vec_rejects_ragged_file(tmp_path):
    f = tmp_path / "g2v.txt"
    f.write_text("A\t1 2 3\nB\t1 2\n")
    with pytest.raises(ValueError, match="2 values where earlier lines had 3"):
        read_gene2vec(f, ["A", "B"])


def test_settings_validation():
    s = scbert._settings.ScBERTSettings()
    with pytest.raises(ValueError, match=r"settings.precision must be one of \('auto', 'float32', .*got 'fp8'\."):
        s.precision = "fp8"
    with pytest.raises(ValueError, match=r"settings.batch_size must be 'auto' or a positive integer, got 0\."):
        s.batch_size = 0
    other = scbert._settings.ScBERTSettings()
    other.batch_size, other.precision = 16, "bfloat16"  # a valid value is kept, per instance
    assert (other.batch_size, other.precision, s.batch_size, s.precision) == (16, "bfloat16", "auto", "auto")
    assert not hasattr(s, "num_workers")  # read by nothing, removed
    with pytest.raises(ValueError, match="device"):
        s.device = "tpu:7"
    s.device = "cpu"
    assert s.resolve_device().type == "cpu"
    assert s.resolve_dtype(s.resolve_device()) is __import__("torch").float32


def test_from_pretrained_wires_registry_and_panel(server, cache, monkeypatch, panel_genes):
    """A full-config nano-format file, served locally under the registry name, loads with the panel."""
    import torch

    from scbert_tl import ScBERT
    from scbert_tl.model import ScBERTConfig, ScBERTNetwork

    www, url = server
    net = ScBERTNetwork(ScBERTConfig(depth=1))
    state = {}
    for k, v in net.state_dict().items():  # the nano-scBERT layout for the keys that differ
        k = k.replace("layers.0.attn_norm.", "performer.net.layers.0.0.norm.")
        k = k.replace("layers.0.attn.projection_matrix", "performer.net.layers.0.0.fn.fast_attention.projection_matrix")
        k = k.replace("layers.0.attn.", "performer.net.layers.0.0.fn.")
        k = k.replace("layers.0.ff_norm.", "performer.net.layers.0.1.norm.")
        k = k.replace("layers.0.ff.", "performer.net.layers.0.1.fn.fn.")
        k = k.replace("gene_emb.weight", "pos_emb.emb.weight").replace("lm_head.", "to_out.")
        state[k] = v
    torch.save(state, www / "nano.pth")
    panel_file = www / "genes.txt"
    panel_file.write_text("\n".join(panel_genes) + "\n")
    monkeypatch.setitem(
        scbert.datasets.REGISTRY,
        "scbert-panglao-weights",
        Asset(name="scbert-panglao-weights", url=f"{url}/nano.pth", git_sha1=git_blob_sha1(www / "nano.pth")),
    )
    monkeypatch.setitem(
        scbert.datasets.REGISTRY,
        "scbert-panglao-genes",
        Asset(
            name="scbert-panglao-genes",
            url=f"{url}/genes.txt",
            sha256=hashlib.sha256(panel_file.read_bytes()).hexdigest(),
        ),
    )
    model = ScBERT.from_pretrained("scbert-panglao")
    assert model.panel == "scbert-panglao" and model.genes == panel_genes
    assert model.provenance["format"] == "nano-scbert"
    assert torch.equal(model.network.layers[0].attn.to_qkv.weight, net.layers[0].attn.to_qkv.weight)


def test_failed_download_says_where_to_put_the_file(server, cache):
    _, url = server
    asset = Asset(name="missing", url=f"{url}/not-there.txt", sha256="0" * 64)
    with pytest.raises(OSError, match=r"Could not download missing .* put it at .*missing"):
        fetch(asset, progressbar=False)
    assert not (cache / "missing").exists()
