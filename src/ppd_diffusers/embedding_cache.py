"""``UserEmbeddingCache``: user embeddings on disk, keyed by what determines them, safe for parallel writers."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .encoder_base import BasePreferenceEncoder
from .preference_pairs import PreferencePair, as_user_pairs

__all__ = ["UserEmbeddingCache"]

logger = logging.getLogger(__name__)


def _image_digest(image: Any) -> bytes:
    # pairs are validated first, so every image is an RGB PIL image: hash its size and pixels
    return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).digest()


class UserEmbeddingCache:
    """Caches an encoder's user embeddings as safetensors files, one per user.

    The key of a user is a SHA-256 of the encoder's ``fingerprint()`` (its class, options, model
    revision, dtype, attention kernel and image processor settings) and of the user's pairs: each
    prompt and the decoded RGB pixels of both images, in order. So re-running over thousands of users
    encodes each user once, and changing the layer, the pooling, the question or the model revision
    starts a fresh set of keys. Files are written to a
    temporary name and renamed into place, so several processes can fill one cache at once.

    A Hub model is identified by its commit hash, a local one by its absolute path, and both by a digest
    of the weights as loaded (``weights_digest``), so replacing the weights behind a path or changing them in
    memory starts a fresh set of keys. A cached file that cannot be read (truncated, corrupt, or of
    another shape) counts as a miss: the user is encoded again and the file replaced. Keys hash decoded
    pixels rather than file bytes, so the same image stored as PNG or JPEG-decoded array is the same user;
    the price is that a resumed run decodes the images of users it already has.

    Args:
        cache_dir: Folder of the cache (created if needed).
        encoder: The encoder whose embeddings are cached.

    Examples:
        ```py
        cache = UserEmbeddingCache("user_embeddings_cache", encoder)
        embeds = cache.encode(users_pairs, batch_size=8)  # encodes only the users not cached yet
        ```
    """

    def __init__(self, cache_dir: str | os.PathLike, encoder: BasePreferenceEncoder):
        self.encoder = encoder
        self.fingerprint = encoder.fingerprint()
        self.directory = os.path.join(os.fspath(cache_dir), self.fingerprint[:16])
        os.makedirs(self.directory, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def key(self, pairs: Sequence[PreferencePair]) -> str:
        """The cache key of one user's validated pairs."""
        digest = hashlib.sha256(self.fingerprint.encode())
        for pair in pairs:
            prompt = pair.prompt.encode()
            digest.update(len(prompt).to_bytes(8, "little") + prompt)
            digest.update(_image_digest(pair.chosen) + _image_digest(pair.rejected))
        return digest.hexdigest()

    def path(self, key: str) -> str:
        return os.path.join(self.directory, key[:2], f"{key}.safetensors")

    def get(self, key: str) -> torch.Tensor | None:
        """The cached embedding ``(tokens, width)`` for ``key``, or ``None`` (also for an unreadable file)."""
        path = self.path(key)
        if not os.path.exists(path):
            return None
        try:
            embedding = load_file(path)["user_embedding"]
        except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
            logger.warning("Unreadable cache entry %s (%s): encoding the user again.", path, error)
            return None
        if tuple(embedding.shape) != (self.encoder.num_tokens, self.encoder.embed_dim):
            logger.warning("Cache entry %s has shape %s: encoding the user again.", path, tuple(embedding.shape))
            return None
        return embedding

    def put(self, key: str, embedding: torch.Tensor) -> None:
        """Stores one user's embedding ``(tokens, width)`` atomically."""
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(fd)
        try:
            save_file({"user_embedding": embedding.detach().cpu().contiguous()}, tmp, {"encoder": self.fingerprint})
            os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a shared cache must be readable by all
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def encode(
        self, preference_pairs: Sequence[Any], batch_size: int = 8, show_progress: bool | None = None
    ) -> torch.Tensor:
        """Like ``encoder.encode``, but reads cached users and encodes (and stores) only the others.

        Returns:
            A float32 CPU tensor ``(users, tokens, width)``, in the order of ``preference_pairs``.
        """
        users = as_user_pairs(preference_pairs, self.encoder.num_pairs, max_side=self.encoder.max_image_side)
        keys = [self.key(pairs) for pairs in users]
        found = {i: emb for i, key in enumerate(keys) if (emb := self.get(key)) is not None}
        missing = [i for i in range(len(users)) if i not in found]
        self.hits += len(found)
        self.misses += len(missing)
        batches = [missing[i : i + batch_size] for i in range(0, len(missing), batch_size)]
        show = len(batches) > 1 if show_progress is None else show_progress
        for batch in tqdm(batches, desc="Encoding users", disable=not show):
            embeds = self.encoder.encode([users[i] for i in batch], batch_size=len(batch), show_progress=False)
            for i, embedding in zip(batch, embeds.cpu(), strict=True):
                self.put(keys[i], embedding)
                found[i] = embedding
        if missing:
            logger.info("User embeddings: %d from the cache, %d encoded.", len(users) - len(missing), len(missing))
        return torch.stack([found[i] for i in range(len(users))]).float()
