"""`UserEmbeddingCache`: hits and misses on the right keys, atomic files, concurrent writers."""

from __future__ import annotations

import glob
import io
import os
import threading

import pytest
import torch

from ppd_diffusers import CLIPPreferenceEncoder, UserEmbeddingCache
from ppd_diffusers.preference_pairs import as_user_pairs

from .conftest import random_users


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir):
    return CLIPPreferenceEncoder.from_pretrained(tiny_clip_dir)


def _files(cache: UserEmbeddingCache) -> list[str]:
    return glob.glob(os.path.join(cache.directory, "*", "*"))


def test_second_pass_reads_everything_from_the_cache(encoder, tmp_path):
    users = random_users(5, seed=10)
    cache = UserEmbeddingCache(tmp_path, encoder)
    first = cache.encode(users, batch_size=2)
    assert (cache.hits, cache.misses) == (0, 5) and len(_files(cache)) == 5
    torch.testing.assert_close(first, encoder.encode(users))
    again = UserEmbeddingCache(tmp_path, encoder)  # a re-run of the script
    assert torch.equal(again.encode(users), first)
    assert (again.hits, again.misses) == (5, 0)
    more = random_users(7, seed=10)[5:]
    again.encode(users[:2] + more)
    assert (again.hits, again.misses) == (7, 2)


def test_keys_change_with_whatever_changes_the_embedding(encoder, tiny_clip_dir, tmp_path):
    cache = UserEmbeddingCache(tmp_path, encoder)
    pairs = as_user_pairs(random_users(1, seed=11))[0]
    key = cache.key(pairs)
    prompt_changed = [pairs[0].__class__(pairs[0].prompt + "!", pairs[0].chosen, pairs[0].rejected), *pairs[1:]]
    swapped = [pairs[0].__class__(pairs[0].prompt, pairs[0].rejected, pairs[0].chosen), *pairs[1:]]
    pixel = pairs[1].chosen.copy()
    pixel.putpixel((0, 0), tuple((v + 1) % 256 for v in pixel.getpixel((0, 0))))
    pixel_changed = [pairs[0], pairs[0].__class__(pairs[1].prompt, pixel, pairs[1].rejected), *pairs[2:]]
    reordered = [pairs[1], pairs[0], *pairs[2:]]
    keys = {cache.key(p) for p in (prompt_changed, swapped, pixel_changed, reordered)}
    assert key not in keys and len(keys) == 4
    mean_encoder = CLIPPreferenceEncoder.from_pretrained(tiny_clip_dir, pooling="mean")
    assert UserEmbeddingCache(tmp_path, mean_encoder).key(pairs) != key
    # the same pixels given as PNG bytes are the same user
    as_png = []
    for pair in pairs:
        buffers = [io.BytesIO(), io.BytesIO()]
        pair.chosen.save(buffers[0], format="PNG")
        pair.rejected.save(buffers[1], format="PNG")
        as_png.append((pair.prompt, buffers[0].getvalue(), buffers[1].getvalue()))
    assert cache.key(as_user_pairs(as_png)[0]) == key


def _write_many(directory: str, key: str, value: float) -> None:
    from ppd_diffusers.embedding_cache import UserEmbeddingCache as Cache

    class Fingerprinted:  # just what the cache reads from an encoder
        def fingerprint(self):
            return "f" * 64

    cache = Cache(directory, Fingerprinted())
    for _ in range(25):
        cache.put(key, torch.full((4, 48), value))


def test_two_processes_writing_the_same_user_leave_one_whole_file(tmp_path):
    import multiprocessing

    key = "cd" + "1" * 62
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_many, args=(str(tmp_path), key, v)) for v in (1.0, 2.0)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    from safetensors.torch import load_file

    (path,) = glob.glob(str(tmp_path / "*" / "cd" / f"{key}.safetensors"))
    stored = load_file(path)["user_embedding"]
    assert torch.equal(stored, torch.full((4, 48), 1.0)) or torch.equal(stored, torch.full((4, 48), 2.0))
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)


def test_writes_are_atomic_and_concurrent_writers_are_safe(encoder, tmp_path):
    cache = UserEmbeddingCache(tmp_path, encoder)
    key = "ab" + "0" * 62
    os.makedirs(os.path.dirname(cache.path(key)), exist_ok=True)
    with open(cache.path(key) + ".tmp-left-by-a-killed-run", "wb") as f:
        f.write(b"partial")
    assert cache.get(key) is None
    values = [torch.full((4, 48), float(i)) for i in range(16)]
    threads = [threading.Thread(target=cache.put, args=(key, v)) for v in values]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = cache.get(key)
    assert any(torch.equal(stored, v) for v in values)  # one whole write won, none is torn
    assert not [f for f in os.listdir(os.path.dirname(cache.path(key))) if f.endswith(".tmp")]


def test_changed_weights_and_unreadable_entries_are_misses(tiny_clip_dir, tmp_path):
    users = random_users(2, seed=12)
    encoder = CLIPPreferenceEncoder.from_pretrained(tiny_clip_dir)
    cache = UserEmbeddingCache(tmp_path, encoder)
    first = cache.encode(users)
    # weights changed in memory after loading (or new weights behind the same local path): new keys
    with torch.no_grad():
        next(encoder.model.parameters()).mul_(1.5)
    changed = UserEmbeddingCache(tmp_path, encoder)
    assert changed.fingerprint != cache.fingerprint
    changed.encode(users)
    assert (changed.hits, changed.misses) == (0, 2)
    # a truncated and a wrongly shaped entry are encoded again and replaced, the others read
    fresh = CLIPPreferenceEncoder.from_pretrained(tiny_clip_dir)
    assert UserEmbeddingCache(tmp_path, fresh).fingerprint == cache.fingerprint  # the same weights, reloaded
    files = sorted(_files(cache), key=os.path.getmtime)
    with open(files[0], "r+b") as f:
        f.truncate(20)
    from safetensors.torch import save_file

    save_file({"user_embedding": torch.zeros(3, 3)}, files[1])
    again = UserEmbeddingCache(tmp_path, fresh)
    torch.testing.assert_close(again.encode(users), first)
    assert (again.hits, again.misses) == (0, 2)
    repaired = UserEmbeddingCache(tmp_path, fresh)
    repaired.encode(users)
    assert (repaired.hits, repaired.misses) == (2, 0)
