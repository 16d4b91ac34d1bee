"""Reading MDS back through Streaming in 1 and 2 real processes (digits and the real Fashion-MNIST):
ranks get disjoint samples covering the epoch exactly once, batches obey the contract, peers with
the same dp_rank get identical batches, the order is deterministic, token-budget packing carries
documents over instead of dropping them, and resume is exact: mid-epoch with documents carried
over, at an epoch's very end, from 2 ranks onto 1, and with any number of workers."""

from dataclasses import asdict, replace

import pytest

from data_pipeline.config import DataConfig, TokenizerSpec
from data_pipeline.loader import build_loader
from tests.data_pipeline.helpers import check_batch, run_ranks

N_SAMPLES = 96


def _cfg(data_dir: str, **kw) -> DataConfig:
    base = dict(local=data_dir, seq_len=160, batch_size=4, image_size=16,
                patch_size=4, channels=1, image_fit="resize", max_images=4, num_canonical_nodes=2,
                seed=3, tokenizer=TokenizerSpec(kind="mistral"))
    base.update(kw)
    return DataConfig(**base)


def _read(cfg, tok, dp_rank=0, dp_size=1, state=None, max_batches=None, check=False):
    out = []
    with build_loader(cfg, tok, dp_rank, dp_size) as loader:
        if state:
            loader.load_state_dict(state)
        for batch in loader:
            if check:
                check_batch(batch, tok, cfg)
            out.append((loader.last_sample_ids, batch))
            if max_batches is not None and len(out) == max_batches:
                break
        return out, loader.state_dict(), dict(loader.stats)


def test_one_process_epoch_is_complete_valid_and_deterministic(digits_dir, tok):
    cfg = _cfg(digits_dir)
    batches, state, stats = _read(cfg, tok, check=True)
    ids = [i for sample_ids, _ in batches for i in sample_ids]
    assert sorted(ids) == list(range(N_SAMPLES))
    assert state["epoch"] == 1 and state["next_index"] == 0 and state["carry"] == []
    assert stats["dropped_docs"] == 0 and stats["skipped"] == 0 and stats["samples"] == N_SAMPLES
    again, _, _ = _read(cfg, tok, max_batches=3)
    assert [a for a, _ in again] == [a for a, _ in batches[:3]]
    assert all(b1["tokens"].equal(b2["tokens"]) for (_, b1), (_, b2) in zip(again, batches))
    other_seed, _, _ = _read(replace(cfg, seed=4), tok, max_batches=1)
    assert other_seed[0][0] != batches[0][0]


def test_workers_and_prefetch_give_the_same_batches_and_states_in_the_same_order(digits_dir, tok):
    """The plan (and its carry-over) lives in the training process and each state travels with its
    batch, so prefetching workers and the prefetch thread (data.prefetch: the planner runs batches
    ahead) change neither the batches nor the state saved after batch k (the resume point), and the
    thread is gone once the loader's pass ends early."""
    import threading
    cfg = _cfg(digits_dir, prefetch=0)
    serial, serial_state, _ = _read(cfg, tok, max_batches=4)
    for kw in (dict(num_workers=2), dict(prefetch=2), dict(prefetch=1, num_workers=2)):
        other, other_state, _ = _read(replace(cfg, **kw), tok, max_batches=4)
        assert [ids for ids, _ in other] == [ids for ids, _ in serial], kw
        assert all(a["tokens"].equal(b["tokens"]) and a["doc_ids"].equal(b["doc_ids"])
                   for (_, a), (_, b) in zip(serial, other)), kw
        assert other_state == serial_state and serial_state["carry"], kw
    assert not [t for t in threading.enumerate() if t.name == "megaflow-data-prefetch"]


def test_second_epoch_reshuffles(digits_dir, tok):
    cfg = _cfg(digits_dir)
    with build_loader(cfg, tok) as loader:
        first = [i for _ in loader for i in loader.last_sample_ids[:1]]
        second = [i for _ in loader for i in loader.last_sample_ids[:1]]
        assert loader.state_dict()["epoch"] == 2
    assert first != second


def test_resume_mid_epoch_is_exact(digits_dir, tok):
    cfg = _cfg(digits_dir)
    full, _, _ = _read(cfg, tok)
    head, state, _ = _read(cfg, tok, max_batches=5)
    assert state["carry"], "the test needs documents carried over at the resume point"
    tail, _, _ = _read(cfg, tok, state=state)
    assert [ids for ids, _ in head + tail] == [ids for ids, _ in full]
    assert all(a["targets"].equal(b["targets"]) for (_, a), (_, b) in zip(tail, full[5:]))


def test_a_state_from_before_the_packing_option_resumes_first_fit(digits_dir, tok):
    """A loader state has the run's packing; one without it (written before `data.packing`) was
    packed first-fit, and resuming it under the new default (`auto`: `fullest` at these 4 rows) still
    gives the batches of the uninterrupted first-fit run (the run keeps its packing; a fresh run takes
    the config's, resolved for its rows, and records that)."""
    old = _cfg(digits_dir, packing="first_fit")
    full, _, _ = _read(old, tok)
    head, state, _ = _read(old, tok, max_batches=5)
    assert state.pop("packing") == "first_fit" and state["carry"]
    tail, after, _ = _read(_cfg(digits_dir), tok, state=state)
    assert [ids for ids, _ in head + tail] == [ids for ids, _ in full]
    assert all(a["tokens"].equal(b["tokens"]) for (_, a), (_, b) in zip(tail, full[5:]))
    assert after["packing"] == "first_fit"
    fresh, fresh_state, _ = _read(_cfg(digits_dir), tok)
    assert [ids for ids, _ in fresh] != [ids for ids, _ in full]  # the new default packs differently
    assert fresh_state["packing"] == "fullest"


def test_token_budget_packing_fills_rows_and_carries_over(digits_dir, tok):
    """Rows are filled to the token budget: documents that do not fit wait in the carry-over (part
    of the state) instead of being dropped, and all but the epoch's last batch are nearly full."""
    cfg = _cfg(digits_dir, max_images=8)
    batches, _, stats = _read(cfg, tok, check=True)
    fills = [float((b["doc_ids"] >= 0).float().mean()) for _, b in batches]
    assert min(fills[:-1]) >= 0.85, fills
    assert stats["dropped_docs"] == 0 and stats["samples"] == N_SAMPLES
    assert stats["text_tokens"] + stats["image_slots"] == sum(int((b["doc_ids"] >= 0).sum()) for _, b in batches)


def test_resume_at_the_end_of_an_epoch(digits_dir, tok):
    """A state saved right after an epoch's last batch is the next epoch's start (issue 11 case 2:
    it used to say 'the whole epoch consumed' and the resumed run got no batches)."""
    cfg = _cfg(digits_dir)
    full, _, _ = _read(cfg, tok)
    with build_loader(cfg, tok) as loader:
        for i, _ in enumerate(loader):
            if i == len(full) - 1:
                state = loader.state_dict()
                break
    assert state["epoch"] == 1 and state["next_index"] == 0 and state["carry"] == []
    second, _, _ = _read(cfg, tok, state=state)
    assert len(second) > 0 and sorted(i for ids, _ in second for i in ids) == list(range(N_SAMPLES))


def test_remote_plus_local_cache(digits_dir, tok, tmp_path):
    cfg = _cfg(str(tmp_path / "cache"), remote=digits_dir)
    batches, _, _ = _read(cfg, tok)
    assert sorted(i for ids, _ in batches for i in ids) == list(range(N_SAMPLES))
    assert (tmp_path / "cache" / "local_rank0" / "index.json").exists()


@pytest.mark.parametrize("dataset", ["digits", "fashion_mnist"])
def test_two_ranks_disjoint_cover_and_resume_onto_one(dataset, request, tmp_path, tok):
    data_dir = request.getfixturevalue("digits_dir" if dataset == "digits" else "fashion_dir")
    size = 16 if dataset == "digits" else 32  # fashion 28x28 is padded to 32x32
    cfg = _cfg(data_dir, image_size=size, image_fit="pad" if size == 32 else "resize", patch_size=size // 4,
               seq_len=128)
    job = {"cfg": asdict(cfg), "dp_size": 2, "check": True, "state_at": 3}
    jobs = [{**job, "dp_rank": 0}, {**job, "dp_rank": 1}]
    if dataset == "digits":  # a tensor-parallel peer of rank 0: same dp_rank, same batches
        jobs.append({**job, "dp_rank": 0, "max_batches": 3, "check": False})
    results = run_ranks(jobs, tmp_path)
    rank_ids = [{i for ids in res["batches"] for i in ids} for res in results[:2]]
    assert not rank_ids[0] & rank_ids[1]
    assert rank_ids[0] | rank_ids[1] == set(range(N_SAMPLES))
    assert len(results[0]["batches"]) == len(results[1]["batches"])
    if dataset == "digits":
        assert results[2]["batches"] == results[0]["batches"][:3]
        assert results[2]["token_sums"] == results[0]["token_sums"][:3]

    # every sample exactly once over the epoch: none dropped, none duplicated
    every = [i for res in results[:2] for ids in res["batches"] for i in ids]
    assert sorted(every) == list(range(N_SAMPLES))
    # after the epoch's last batch both ranks' states are the next epoch's start (issue 11 case 2)
    assert results[0]["state"] == results[1]["state"]
    assert (results[0]["state"]["epoch"], results[0]["state"]["next_index"], results[0]["state"]["carry"]) == (1, 0, [])

    # Both ranks checkpoint after 3 batches (identical states); one rank resumes from there.
    state = results[0]["state_at"]
    assert state == results[1]["state_at"] and state["dp_size"] == 2
    seen = [i for res in results[:2] for ids in res["batches"][:3] for i in ids]
    tail, end_state, _ = _read(cfg, tok, state=state, check=True)
    seen_after = [i for ids, _ in tail for i in ids]
    assert sorted(seen + seen_after) == list(range(N_SAMPLES))
    assert end_state["epoch"] == 1


def test_repeated_passes_leave_nothing_for_the_resource_tracker(digits_dir):
    """Several passes over one loader (an eval loader is iterated at every evaluation), then close:
    the process exits without Python's resource tracker reporting leaked or missing segments
    (each pass used to orphan Streaming's `_resume` segment, which the end of `make train` showed)."""
    import subprocess
    import sys
    from tests.data_pipeline.helpers import REPO
    script = f"""
from data_pipeline.config import DataConfig, TokenizerSpec
from data_pipeline.loader import build_loader
from data_pipeline.tokenizer import load_tokenizer
from tests.data_pipeline.test_loader import _cfg
loader = build_loader(_cfg({digits_dir!r}, shuffle=False), load_tokenizer(TokenizerSpec(kind="mistral")), 0, 1)
for _ in range(3):
    for i, batch in enumerate(loader):
        if i == 1:
            break
loader.close()
print("passes done")
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "passes done" in res.stdout, res.stderr[-3000:]
    assert "resource_tracker" not in res.stderr, res.stderr[-3000:]
