"""Offline CLIP tokenizers built from the BPE vocabulary that open_clip ships.

open_clip's ``bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's byte-level BPE table, the same one
Stable Diffusion's ``tokenizer/`` folder holds as ``vocab.json`` + ``merges.txt``. Rebuilding
those two files from it lets tests and the toy model tokenize exactly as SD does without any
download.

It is in core because several plugin packages use it (the SD backbones fall back to it when a
folder has no ``tokenizer/``, the toy model trains with it), and plugin packages do not import
one another.
"""

from __future__ import annotations

import functools
import gzip
import json
import tempfile
from pathlib import Path

#: number of BPE merges in CLIP's vocabulary (49152 tokens = 256 bytes x 2 + merges + 2 specials)
_NUM_MERGES = 49152 - 256 - 2
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (a published, fixed table)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _open_clip_bpe() -> Path:
    import open_clip.tokenizer as oct

    return Path(oct.default_bpe())


def write_clip_tokenizer_files(folder: str | Path, pad_token: str = EOS, model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and configs of a CLIP tokenizer into ``folder``.

    ``pad_token``: ``<|endoftext|>`` for SD1.x/SDXL encoder 1, ``"!"`` for SD2.x/SDXL encoder 2.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(_open_clip_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
        "errors": "replace",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}, indent=2)
    )
    return folder


@functools.lru_cache(maxsize=4)
def _cached_folder(pad_token: str, model_max_length: int) -> str:
    folder = Path(tempfile.mkdtemp(prefix="t2ialign-clip-tok-"))
    return str(write_clip_tokenizer_files(folder, pad_token, model_max_length))


def clip_tokenizer(pad_token: str = EOS, model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` equal to Stable Diffusion's, built offline."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_cached_folder(pad_token, model_max_length))
