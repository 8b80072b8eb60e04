"""prune_checkpoints keeps the newest few and every pinned checkpoint (the service pins the best)."""

from __future__ import annotations

from styleinject.train.checkpoint import (
    CHECKPOINTS_DIR,
    STATE_NAME,
    checkpoint_name,
    list_checkpoints,
    pin_checkpoint,
    prune_checkpoints,
    unpin_checkpoint,
)


def _fake_checkpoints(root, steps):
    for step in steps:
        folder = root / CHECKPOINTS_DIR / checkpoint_name(step)
        folder.mkdir(parents=True)
        (folder / STATE_NAME).write_text("{}")


def test_pinned_checkpoints_survive_pruning_and_do_not_count_against_keep(tmp_path):
    _fake_checkpoints(tmp_path, [1, 2, 3, 4, 5])
    first = list_checkpoints(tmp_path)[0]
    pin_checkpoint(first, "best clipscore so far")
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(s) for s in (1, 4, 5)]
    unpin_checkpoint(first)
    unpin_checkpoint(first)  # twice is fine: the worker unpins every checkpoint that is not the best
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(s) for s in (4, 5)]
