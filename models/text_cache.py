"""A disk cache of the text classifier's category embeddings, shared between processes.

`TextClassifier` keeps the embeddings of the names it has seen in memory; this cache keeps them on
disk so that a second process (a second `demo.py` run, another `Predictor`) does not run the text
tower again. An entry is valid only for the exact text tower that computed it: the file name is a
fingerprint of the tower's tensors (names, dtypes, shapes and bytes), `text_len`, the prompt
templates and the tokenizer, so changed weights, another `text_len` or other templates read
another file, and stale embeddings are never returned.

The device is not part of the fingerprint: one file serves CPU and CUDA runs of the same weights. The
embeddings are always computed in full fp32 (`TextClassifier.embed_names` switches TF32 off,
`util.numerics`), where a GPU's and a CPU's differ by float rounding only (of the order of 1e-6 on these
unit vectors, far below what changes a detection; not measured on a GPU yet); TF32's 10-bit mantissa
would make that about 1e-3, which is why it is never used for them.

Files are `<directory>/<fingerprint>.pt`, `{'format', 'fingerprint', 'text_len', 'embeddings':
{name: float tensor [D]}}`, read with `torch.load(weights_only=True)` and replaced atomically, so a
crash or two processes writing at once can lose entries (they are recomputed later) but never leave
a corrupt file behind.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from models.clip import PROMPT_TEMPLATES, TextClassifier

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """`$CORA_CACHE_DIR/text_embeddings`, else `$XDG_CACHE_HOME/cora/text_embeddings` (default `~/.cache`)."""
    root = os.environ.get("CORA_CACHE_DIR")
    if root:
        return Path(root) / "text_embeddings"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "cora" / "text_embeddings"


def text_tower_fingerprint(classifier: TextClassifier) -> str:
    """sha256 over everything that determines a name's embedding (hex, 64 characters)."""
    h = hashlib.sha256()
    h.update(f"cora-text-embeddings/{CACHE_FORMAT}\n".encode())
    h.update(f"text_len={classifier.text_len}\n".encode())
    h.update(f"tokenizer={type(classifier._tokenizer).__module__}.{type(classifier._tokenizer).__name__}\n".encode())
    h.update(("\n".join(PROMPT_TEMPLATES) + "\n").encode())
    for key, tensor in sorted(classifier.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        # Raw bytes (any dtype, bfloat16 included): equal fingerprints mean bit-identical weights.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TextEmbeddingDiskCache:
    """The embeddings of one text tower (identified by `fingerprint`) under `directory`."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.path = self.directory / f"{fingerprint}.pt"

    def load(self) -> dict[str, torch.Tensor]:
        """Every stored embedding; `{}` when there is no file. A damaged or foreign file is reported
        (warning) and ignored: it is rewritten with fresh embeddings on the next `save`."""
        if not self.path.is_file():
            return {}
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
            if (not isinstance(data, dict) or data.get("format") != CACHE_FORMAT
                    or data.get("fingerprint") != self.fingerprint or not isinstance(data.get("embeddings"), dict)):
                raise ValueError("not a text-embedding cache of this text tower")
            embeddings = data["embeddings"]
            if not all(isinstance(k, str) and torch.is_tensor(v) and v.ndim == 1 for k, v in embeddings.items()):
                raise ValueError("entries are not name -> 1-D tensor")
            return embeddings
        except Exception as e:  # any unreadable file only costs a recomputation
            warnings.warn(f"text-embedding cache {self.path} ignored ({type(e).__name__}: {e}); "
                          f"the embeddings are recomputed and the file rewritten", stacklevel=2)
            return {}

    def save(self, new: dict[str, torch.Tensor], *, text_len: int) -> None:
        """Add `new` to the file (merged with what another process may have written meanwhile)."""
        if not new:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        embeddings = self.load()
        embeddings.update({name: emb.detach().to("cpu").clone() for name, emb in new.items()})
        payload = {"format": CACHE_FORMAT, "fingerprint": self.fingerprint, "text_len": text_len,
                   "embeddings": embeddings}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def fill_text_cache(classifier: TextClassifier, names: Sequence[str],
                    disk: TextEmbeddingDiskCache | None) -> int:
    """Make sure `classifier.cache` holds every name of `names`: from memory, else from `disk`, else
    by running the text tower once for all the missing names (and storing them on `disk`).

    Returns how many names were encoded by the text tower.
    """
    missing = [n for n in dict.fromkeys(names) if n not in classifier.cache]
    if missing and disk is not None:
        stored = disk.load()
        for name in missing:
            if name in stored:
                classifier.cache[name] = stored[name]
        missing = [n for n in missing if n not in classifier.cache]
    if not missing:
        return 0
    embeddings = classifier.embed_names(missing)
    fresh = {name: emb.cpu() for name, emb in zip(missing, embeddings)}
    classifier.cache.update(fresh)
    if disk is not None:
        try:
            disk.save(fresh, text_len=classifier.text_len)
        except OSError as e:  # a read-only cache folder must not stop a prediction
            warnings.warn(f"text-embedding cache {disk.path} not written ({e})", stacklevel=2)
    return len(missing)
