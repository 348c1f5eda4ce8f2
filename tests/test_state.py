"""MemoryState: the in-place O(K) update against the pure ``update_pool`` rule, undo, clones, and
the state file (bit-exact round trip, named errors for damaged or foreign files, atomic save)."""

from __future__ import annotations

import os
import struct

import pytest
import torch
from conftest import assert_same_snapshot, pool_snapshot, ref_keep, tiny_lm
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from latentmem.memoryllm import MemoryState, MemoryStateError, update_pool
from latentmem.statefile import digest as _digest

torch.set_num_threads(1)  # tiny tensors: extra threads only fight over the shared CPU

L, N, K, D = 2, 12, 4, 3  # a small pool: 2 layers, 12 tokens of width 3, 4 written per update


def rows(seed: int, k: int = K) -> torch.Tensor:
    return torch.randn(L, k, D, generator=torch.Generator().manual_seed(seed))


def updated_state(updates: int = 3, seed: int = 5, per_layer: bool = True) -> MemoryState:
    state = MemoryState.empty(L, N, D, seed=seed, model_id="model-a")
    for i in range(updates):
        state.write_update_(rows(100 + i), injection_id=i + 1, per_layer_drop=per_layer)
    return state


# --------------------------------------------------------------------------------------------
# The in-place update against the pure rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_layer", [False, True], ids=["shared-drop", "per-layer-drop"])
def test_write_update_equals_update_pool_with_the_same_keep_indices(per_layer):
    state = MemoryState.empty(L, N, D, seed=7)
    generator = torch.Generator().manual_seed(7)  # the pool's drop generator, replayed
    expected = torch.zeros(1, L, N, D)
    expected_prov = torch.full((L, N), -1)
    for step in range(6):
        new = rows(step)
        keep = ref_keep(generator, L, N, K, per_layer) if state.initialized else None
        expected = update_pool(expected, torch.tensor([state.initialized]), new[None], torch.tensor([K]), [keep])
        if keep is None:
            expected_prov = torch.full((L, N), step)
        else:
            expected_prov = torch.cat([expected_prov.gather(1, keep.expand(L, -1)), torch.full((L, K), step)], 1)
        state.write_update_(new, injection_id=step, per_layer_drop=per_layer)
        assert torch.equal(state.logical_memory(), expected[0])
        assert torch.equal(state.logical_provenance(), expected_prov)
        # exactly K slots per layer were rewritten (all N on the first, tiling update)
        assert ((state.provenance == step).sum(1) == (N if step == 0 else K)).all()
    assert state.update_count == 6 and state.initialized
    # not vacuous: the physical layout really differs from the logical order
    assert not torch.equal(state.order, torch.arange(N).expand(L, N))
    if not per_layer:  # the same logical slots were dropped in every layer
        assert torch.equal(state.logical_provenance()[0], state.logical_provenance()[1])


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(1, 3), k=st.integers(1, 5), blocks=st.integers(1, 4), first=st.integers(1, 5),
    steps=st.integers(1, 7), per_layer=st.booleans(), seed=st.integers(0, 2**31),
)
def test_any_update_sequence_matches_the_rule_and_undoes_to_empty(layers, k, blocks, first, steps, per_layer, seed):
    n = k * blocks
    first = min(first, k)  # the first context may be shorter than K: then it is tiled
    state = MemoryState.empty(layers, n, 2, seed=seed)
    empty = pool_snapshot(state)
    replay = torch.Generator().manual_seed(seed)
    expected = torch.zeros(1, layers, n, 2)
    records = []
    for step in range(steps):
        new = torch.randn(layers, first if step == 0 else k, 2, generator=torch.Generator().manual_seed(step))
        keep = ref_keep(replay, layers, n, k, per_layer) if step else None
        expected = update_pool(expected, torch.tensor([step > 0]), new[None], torch.tensor([new.shape[1]]), [keep])
        records.append(state.write_update_(new, injection_id=step, per_layer_drop=per_layer))
        assert torch.equal(state.logical_memory(), expected[0])
    for record in reversed(records):
        state.undo_(record)
    assert_same_snapshot(pool_snapshot(state), empty)


def test_first_short_update_tiles_the_empty_pool():
    """A context shorter than K fills an empty pool by tiling, here with N % k != 0."""
    state = MemoryState.empty(L, N, D)
    new = rows(1, k=5)
    state.write_update_(new, injection_id=1)
    assert torch.equal(state.logical_memory(), torch.cat([new, new, new[:, 3:]], dim=1))  # 5 + 5 + last 2
    assert (state.provenance == 1).all()


def test_positions_and_tail_follow_the_logical_order():
    state = updated_state(4)
    positions = state.positions()
    for l in range(L):
        assert positions[l, state.order[l]].tolist() == list(range(N))
    assert torch.equal(state.tail(K), state.logical_memory()[:, -K:])
    assert torch.equal(state.tail(K), rows(103))  # the last update's tokens are the newest


def test_draw_keep_indices_are_sorted_unique_and_follow_the_generator():
    state = updated_state(1)
    replay = torch.Generator()
    replay.set_state(state.generator.get_state())
    keep = state.draw_keep_indices(L, K, per_layer=True)
    assert keep.shape == (L, N - K)
    for row in keep:
        assert row.tolist() == sorted(set(row.tolist()))
    assert torch.equal(keep, ref_keep(replay, L, N, K, per_layer=True))


# --------------------------------------------------------------------------------------------
# Undo and clones
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start_updates", [0, 2], ids=["from-empty", "from-filled"])
def test_undo_restores_every_bit(start_updates):
    state = updated_state(start_updates)
    before = pool_snapshot(state)
    records = [state.write_update_(rows(50 + i), injection_id=9) for i in range(3)]
    assert not torch.equal(state.logical_memory(), before["memory"])
    for record in reversed(records):
        state.undo_(record)
    assert_same_snapshot(pool_snapshot(state), before)
    assert state.cache is None


def test_deep_clone_is_independent():
    state = updated_state(2)
    copy = state.clone()
    assert copy.equal(state)
    copy.write_update_(rows(60), injection_id=7)
    assert not copy.equal(state)
    assert_same_snapshot(pool_snapshot(state), pool_snapshot(updated_state(2)))


def test_shallow_clone_is_safe_to_update():
    """clone(deep=False) shares the tensors; its docstring promises that updating either one
    leaves the other intact."""
    state = updated_state(2)
    shallow = state.clone(deep=False)
    shallow.write_update_(rows(61), injection_id=7)
    assert_same_snapshot(pool_snapshot(state), pool_snapshot(updated_state(2)))
    state.write_update_(rows(62), injection_id=8)
    expected = updated_state(2)
    expected.write_update_(rows(61), injection_id=7)
    assert shallow.equal(expected)


def test_equal_sees_every_difference():
    a, b = updated_state(2), updated_state(2)
    assert a.equal(b)
    b.memory[0, 0, 0] += 1e-7
    assert not a.equal(b)
    b = updated_state(2)
    b.generator.manual_seed(123)
    assert not a.equal(b)
    b = updated_state(2)
    b.update_count += 1
    assert not a.equal(b)


# --------------------------------------------------------------------------------------------
# State files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    state = updated_state(3)
    state.memory = state.memory.to(dtype)
    state.last_injection_id = 3
    path = tmp_path / "m.safetensors"
    state.save(path)
    loaded = MemoryState.load(path, expect_shape=(L, N, D), expect_model_id="model-a")
    assert loaded.equal(state)
    assert loaded.memory.dtype == dtype
    assert (loaded.seed, loaded.initialized, loaded.update_count, loaded.last_injection_id, loaded.model_id, loaded.version) == (
        state.seed, True, 3, 3, "model-a", state.version)
    # the generator state came back too: the next update is the same with or without the reload
    state.write_update_(rows(70), injection_id=4)
    loaded.write_update_(rows(70), injection_id=4)
    assert loaded.equal(state)


def test_next_injection_after_reload_equals_the_one_without(tmp_path):
    lm = tiny_lm()
    first, second = "Alice lives in Zurich and works as an engineer at a bakery.", "The meeting was moved to Thursday at three in the afternoon."
    mem = lm.new_memory(seed=3)
    lm.inject(mem, first)
    mem.save(tmp_path / "m.safetensors")
    reloaded = lm.load_memory(tmp_path / "m.safetensors")
    for m in (mem, reloaded):
        lm.inject(m, second)
    assert reloaded.equal(mem)
    assert reloaded.update_count == sum(len(lm.chunk(lm.encode(t))) for t in (first, second))
    assert reloaded.last_injection_id == 2


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.safetensors"
    updated_state(2).save(path)
    return path


def header_length(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize("keep", [0, 7, 100, -1000, -1], ids=["empty", "7-bytes", "in-header", "in-data", "last-byte"])
def test_truncated_file_is_refused(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep])
    with pytest.raises(MemoryStateError, match="truncated or corrupted"):
        MemoryState.load(saved)


def test_a_flipped_byte_anywhere_is_detected(saved):
    """Tensor data and metadata alike: a flipped bit in the counters or the 'initialized' flag
    would silently change what the next injection does."""
    data = saved.read_bytes()
    positions = list(range(header_length(data))) + list(range(header_length(data), len(data), 97))
    for pos in positions:
        damaged = bytearray(data)
        damaged[pos] ^= 0x01
        saved.write_bytes(bytes(damaged))
        with pytest.raises(MemoryStateError):
            MemoryState.load(saved, expect_shape=(L, N, D), expect_model_id="model-a")
            pytest.fail(f"flipping byte {pos} ({chr(data[pos])!r}) went unnoticed")


def test_data_corruption_is_named_a_checksum_mismatch(saved):
    data = bytearray(saved.read_bytes())
    data[-10] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(MemoryStateError, match="checksum mismatch"):
        MemoryState.load(saved)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(MemoryStateError, match="not found"):
        MemoryState.load(tmp_path / "absent.safetensors")


def test_wrong_shape_names_the_dimension(saved):
    with pytest.raises(MemoryStateError, match=r"memory tokens N: file 12 vs model 16"):
        MemoryState.load(saved, expect_shape=(L, 16, D))


def test_wrong_model_is_named(saved):
    with pytest.raises(MemoryStateError, match="made for model 'model-a', but this model is 'model-b'"):
        MemoryState.load(saved, expect_model_id="model-b")


def write_raw(path, tensors: dict, **meta) -> None:
    """A state file written by hand (valid checksum) to reach the loader's later checks."""
    meta = {"format": "memoryllm-state/1", "seed": "0", "initialized": "1", "update_count": "1", "last_injection_id": "1", "model_id": "", "version": "1", **meta}
    save_file(tensors, str(path), metadata={**meta, "sha256": _digest(tensors, meta)})


def good_tensors() -> dict:
    return {"memory": torch.zeros(L, N, D), "provenance": torch.zeros(L, N, dtype=torch.long), "generator_state": torch.Generator().get_state()}


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(meta={"format": "other/9"}), "unknown format 'other/9'"),
        (dict(drop="provenance"), r"missing tensors \['provenance'\]"),
        (dict(provenance=torch.zeros(L, N + 1, dtype=torch.long)), "inconsistent shapes"),
        (dict(generator_state=torch.zeros(3, dtype=torch.uint8)), "bad generator state"),
        (dict(meta={"update_count": "many"}), "bad generator state or metadata"),
    ],
    ids=["format", "missing-tensor", "inconsistent-shapes", "generator", "counter"],
)
def test_malformed_files_are_named(tmp_path, change, message):
    tensors = good_tensors()
    tensors.pop(change.get("drop", ""), None)
    tensors.update({k: v for k, v in change.items() if k not in ("meta", "drop")})
    write_raw(tmp_path / "m.safetensors", tensors, **change.get("meta", {}))
    with pytest.raises(MemoryStateError, match=message):
        MemoryState.load(tmp_path / "m.safetensors")


def _fail_midway(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"half a file")
    raise OSError("disk full")


@pytest.mark.parametrize("where", ["write", "rename"])
def test_failed_save_keeps_the_old_file_and_leaves_no_temp_files(saved, monkeypatch, where):
    old = saved.read_bytes()
    if where == "write":
        monkeypatch.setattr("latentmem.statefile.save_file", _fail_midway)  # where every memory file is written
    else:
        def refuse(*args):
            raise OSError("rename failed")

        monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        updated_state(5).save(saved)
    assert saved.read_bytes() == old
    assert os.listdir(saved.parent) == [saved.name]
