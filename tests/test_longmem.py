"""LongMem: the model, the bank and the interface against an independent float64 reference written
from the paper (one sequence at a time, explicit loops over heads and chunks), on tiny random
models. The conformance suite (test_conformance.py) runs the shared contract over it too."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CORPUS, _linear, _rms_norm, _rope, make_tokenizer, randomize_, ref_layer

from latentmem import MemoryFormatError
from latentmem.longmem import (
    LongMem,
    LongMemConfig,
    LongMemLM,
    LongMemState,
    chunk_means,
    joint_attention,
    memory_attention,
    top_chunks,
)
from latentmem.longmem.bank import faiss_top_chunks


def tiny_longmem_config(**overrides) -> LongMemConfig:
    tok = make_tokenizer()
    base = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, chunk_size=4, memory_topk=8, capacity_tokens=4096,
        max_inject_tokens=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    base.update(overrides)
    return LongMemConfig(**base)


def tiny_longmem(seed: int = 0, **overrides) -> LongMemLM:
    """A tiny LongMem whose every weight is random (SideNet independent of the backbone, gates
    away from 0.5), so a tensor used in the wrong place changes the outputs."""
    model = LongMem(tiny_longmem_config(**overrides))
    randomize_(model, seed)
    return LongMemLM(model.eval(), make_tokenizer(), name="tiny")


# --------------------------------------------------------------------------------------------
# The float64 reference (paper section 3 and the release's forward, not model.py's fast path)
# --------------------------------------------------------------------------------------------


def _causal_layer(layer, x, cfg):
    T = x.shape[0]
    return ref_layer(layer, x, torch.arange(T), torch.ones(T, T, dtype=torch.bool).tril(), cfg)


@torch.no_grad()
def ref_bank_entries(model, ids):
    """Keys (no RoPE) and values [T, Hkv, hd] of the backbone's memory layer for one segment."""
    cfg = model.config
    h = model.model.embed_tokens.weight.double()[torch.as_tensor(ids)]
    for layer in model.model.layers[: cfg.memory_layer]:
        h = _causal_layer(layer, h, cfg)
    layer = model.model.layers[cfg.memory_layer]
    x = _rms_norm(layer.input_layernorm, h)
    T = len(ids)
    k = _linear(layer.self_attn.k_proj, x).view(T, cfg.num_key_value_heads, cfg.head_dim)
    v = _linear(layer.self_attn.v_proj, x).view(T, cfg.num_key_value_heads, cfg.head_dim)
    return k, v


def ref_retrieve(q, keys, values, valid, n):
    """One query [hd] of one head against a bank of that head's chunks (keys/values [C, c, hd],
    valid [C, c]): the n chunks with the largest q . mean(key), their valid tokens."""
    scored = []
    for j in range(keys.shape[0]):
        mean = keys[j][valid[j]].mean(0)
        scored.append((float(q @ mean), j))
    best = [j for _, j in sorted(scored, key=lambda s: -s[0])[:n]]
    ks = torch.cat([keys[j][valid[j]] for j in best])
    vs = torch.cat([values[j][valid[j]] for j in best])
    return ks, vs, best


@torch.no_grad()
def ref_memory_layer(layer, x, bank, cfg):
    """The memory-augmented SideNet layer on one sequence x [T, d]: per head, local causal
    attention with RoPE and attention over the retrieved tokens without positions, each with its
    own softmax, mixed by g = sigmoid(memory_bias)."""
    T = x.shape[0]
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    att = layer.self_attn
    xn = _rms_norm(layer.input_layernorm, x)
    q = _linear(att.q_proj, xn).view(T, H, hd).transpose(0, 1)
    k = _linear(att.k_proj, xn).view(T, Hkv, hd).transpose(0, 1)
    v = _linear(att.v_proj, xn).view(T, Hkv, hd).transpose(0, 1)
    pos = torch.arange(T)
    qr, kr = _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta)
    gate = torch.sigmoid(att.memory_bias.double())
    heads = []
    for h in range(H):
        kvh = h // (H // Hkv)
        rows = []
        for t in range(T):
            s = (kr[kvh, : t + 1] @ qr[h, t]) / math.sqrt(hd)
            local = s.softmax(-1) @ v[kvh, : t + 1]
            if bank is None:
                rows.append(local)
                continue
            bk, bv, bvalid = bank
            mk, mv, _ = ref_retrieve(q[h, t], bk[:, kvh], bv[:, kvh], bvalid, cfg.memory_topk // cfg.chunk_size)
            mem = ((mk @ q[h, t]) / math.sqrt(hd)).softmax(-1) @ mv
            rows.append((1 - gate[h]) * local + gate[h] * mem)
        heads.append(torch.stack(rows))
    out = torch.stack(heads, 1).reshape(T, H * hd)
    hmid = x + _linear(att.o_proj, out)
    mlp = layer.mlp
    hn = _rms_norm(layer.post_attention_layernorm, hmid)
    return hmid + _linear(mlp.down_proj, torch.nn.functional.silu(_linear(mlp.gate_proj, hn)) * _linear(mlp.up_proj, hn))


@torch.no_grad()
def ref_logits(lm, memory, ids):
    """Logits [T, V] (float64) of one sequence: backbone hidden states H[0..L], SideNet layers with
    the cross-network residual of ``cross_residual``, the memory layer reading the bank (None or
    empty: no memory), the shared head on the SideNet's normed output."""
    model = lm.model
    cfg = model.config
    bank = None
    if memory is not None and memory.num_chunks:
        lg = memory.logical()
        bank = (lg["keys"].double(), lg["values"].double(), lg["valid"])
    h = model.model.embed_tokens.weight.double()[torch.as_tensor(ids)]
    hidden = [h]
    for layer in model.model.layers:
        h = _causal_layer(layer, h, cfg)
        hidden.append(h)
    x, r, L, n = hidden[0], cfg.reduction_factor, cfg.num_hidden_layers, cfg.side_layers

    def side(i, layer, x):
        return ref_memory_layer(layer, x, bank, cfg) if i == cfg.side_memory_layer else _causal_layer(layer, x, cfg)

    if cfg.cross_residual == "release":  # layer(x) + H[r i + r] - H[r i], H[L] after the final norm
        hidden[L] = _rms_norm(model.model.norm, hidden[L])
        for i, layer in enumerate(model.sidenet.layers):
            x = side(i, layer, x) + hidden[r * i + r] - hidden[r * i]
    else:  # layer(x + H[r i + r - 1] - H[r i]); the backbone's last layers past the SideNet's
        for i, layer in enumerate(model.sidenet.layers):
            x = side(i, layer, x + hidden[r * i + r - 1] - hidden[r * i])
        x = x + hidden[L] - hidden[r * n]
    return _linear(model.lm_head, _rms_norm(model.sidenet.norm, x))


def filled(lm, texts=CORPUS[:3], seed=0):
    mem = lm.new_memory(seed=seed)
    for t in texts:
        lm.inject(mem, t)
    return mem


# --------------------------------------------------------------------------------------------
# Config and construction
# --------------------------------------------------------------------------------------------


def test_default_layers_mirror_the_release():
    release = tiny_longmem_config(num_hidden_layers=24)
    assert (release.memory_layer, release.side_layers, release.side_memory_layer) == (17, 12, 8)
    smol = tiny_longmem_config(num_hidden_layers=30)  # SmolLM2-135M: the SideNet's memory layer is a copy of the memory layer
    assert (smol.memory_layer, smol.side_layers, smol.side_memory_layer) == (21, 15, 10)
    assert 2 * smol.side_memory_layer + 1 == smol.memory_layer
    assert (smol.chunk_size, LongMemConfig.memory_topk, LongMemConfig.capacity_tokens) == (4, 64, 65536)
    with pytest.raises(ValueError):
        tiny_longmem_config(memory_layer=9)


@pytest.mark.parametrize("residual", ["aligned", "release"])
def test_sidenet_is_initialised_from_backbone_layers_with_shared_embeddings_and_head(residual):
    model = LongMem(tiny_longmem_config(num_hidden_layers=6, tie_word_embeddings=True, cross_residual=residual))
    randomize_(model, 3)
    model.init_sidenet_from_backbone()
    model.freeze_backbone()
    for i, layer in enumerate(model.sidenet.layers):
        assert model.config.source_layer(i) == 2 * i + 1
        src = model.model.layers[2 * i + 1].state_dict()
        for name, t in layer.state_dict().items():
            if name != "self_attn.memory_bias":
                assert torch.equal(t, src[name]), (i, name)
    gate = torch.sigmoid(model.sidenet.layers[model.config.side_memory_layer].self_attn.memory_bias)
    assert torch.equal(gate, torch.full_like(gate, 0.5))
    assert torch.equal(model.sidenet.norm.weight, model.model.norm.weight)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # shared, not copied
    assert not any(p.requires_grad for p in model.model.parameters())
    assert all(p.requires_grad for p in model.sidenet.parameters())


# --------------------------------------------------------------------------------------------
# The bank
# --------------------------------------------------------------------------------------------


def test_bank_holds_the_backbone_keys_before_rope_in_tagged_chunks():
    lm = tiny_longmem(max_inject_tokens=64)  # one segment
    mem = lm.new_memory()
    text = CORPUS[5]
    ids = lm.encode(text)
    r = lm.inject(mem, text, injection_id=7)
    assert r.num_tokens == len(ids) and r.num_chunks == 1 and len(ids) % 4 != 0
    k, v = ref_bank_entries(lm.model, ids)
    lg = mem.logical()
    C = math.ceil(len(ids) / 4)
    assert lg["keys"].shape == (C, 2, 4, 8) and lm.owners(mem).tolist() == [7] * C
    assert lg["valid"].sum() == len(ids) and not lg["valid"][-1, len(ids) % 4 :].any()
    got_k = lg["keys"].transpose(1, 2).reshape(C * 4, 2, 8)[: len(ids)]
    got_v = lg["values"].transpose(1, 2).reshape(C * 4, 2, 8)[: len(ids)]
    torch.testing.assert_close(got_k.double(), k, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_v.double(), v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mem.means[mem.order()], chunk_means(lg["keys"], lg["valid"]))


def test_a_texts_chunks_do_not_depend_on_what_was_written_before():
    """The RoPE decision: keys are cached position-free and each segment is read alone, so a
    text's chunks are bit-identical whenever it is written."""
    lm = tiny_longmem()
    alone = filled(lm, [CORPUS[3]])
    later = filled(lm, [CORPUS[0], CORPUS[1], CORPUS[3]])
    a, b = alone.logical(), later.logical()
    n = a["keys"].shape[0]
    for key in ("keys", "values", "valid"):
        assert torch.equal(a[key], b[key][-n:])


def test_long_texts_are_written_in_segments_of_whole_chunks():
    lm = tiny_longmem()
    mem = lm.new_memory()
    text = " ".join(CORPUS)
    ids = lm.encode(text)
    r = lm.inject(mem, text)
    assert r.num_chunks == math.ceil(len(ids) / 32) and r.num_tokens == len(ids)
    valid = mem.logical()["valid"]
    assert int(valid.sum()) == len(ids) and bool(valid[:-1].all())  # only the very last chunk is partial
    assert mem.update_count == r.num_chunks


def test_fifo_eviction_keeps_the_newest_chunks_and_forget_says_when_it_is_not_exact():
    lm = tiny_longmem(capacity_tokens=48)  # 12 chunks
    mem = lm.new_memory()
    for t in CORPUS[:4]:
        lm.inject(mem, t)
    per_text = [math.ceil(len(lm.encode(t)) / 4) for t in CORPUS[:4]]
    assert lm.info(mem).used_units == 12 and mem.evicted_chunks == sum(per_text) - 12
    owners = lm.owners(mem).tolist()
    assert owners == sorted(owners) and owners[-per_text[3]:] == [4] * per_text[3]  # oldest went first
    # chunks of injections 1..4 written before / when chunks were evicted: forgetting 4 is not exact
    r = lm.forget(mem.clone(), 4)
    assert not r.exact and r.note
    lm.inject(mem, CORPUS[4])
    before = mem.clone()
    # injection 5 came after evictions, and its own write evicted too: not exact either
    assert not lm.forget(before.clone(), 5).exact
    # a write after the last eviction that evicts nothing (it fits the slots a forget freed)
    lm.forget(mem, 5)
    ref = mem.clone()
    lm.inject(mem, CORPUS[4])  # the same size as injection 5
    assert mem.evicted_chunks == ref.evicted_chunks
    r = lm.forget(mem, 6)
    assert r.exact and mem.equal(ref)


def test_forget_removes_exactly_one_injection_anywhere_in_the_bank(tmp_path):
    lm = tiny_longmem()
    mem = filled(lm, CORPUS[:4])
    r = lm.forget(mem, 2)
    assert r.exact and r.removed_units == math.ceil(len(lm.encode(CORPUS[1])) / 4)
    never = lm.new_memory()
    for i, t in enumerate(CORPUS[:4], 1):
        if i != 2:
            lm.inject(never, t, injection_id=i)
    assert mem.equal(never) and lm.differences(mem, never) == []
    assert lm.score([mem], ["Alice lives in"], ["Zurich"]) == lm.score([never], ["Alice lives in"], ["Zurich"])
    lm.inject(mem, CORPUS[5])  # the freed slots are reused; still equal to the bank that never had it
    lm.inject(never, CORPUS[5], injection_id=5)
    assert mem.equal(never)
    mem.save(tmp_path / "m.safetensors")
    assert lm.load_memory(tmp_path / "m.safetensors").equal(never)


def test_bad_files_are_refused_with_clear_errors(tmp_path):
    lm = tiny_longmem()
    mem = filled(lm)
    path = tmp_path / "m.safetensors"
    mem.save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(MemoryFormatError, match="checksum|corrupt"):
        lm.load_memory(tmp_path / "bad.safetensors")
    (tmp_path / "short.safetensors").write_bytes(bytes(data[:100]))
    with pytest.raises(MemoryFormatError):
        lm.load_memory(tmp_path / "short.safetensors")
    with pytest.raises(MemoryFormatError, match="capacity"):
        tiny_longmem(capacity_tokens=16).load_memory(path)
    with pytest.raises(MemoryFormatError, match="does not fit"):
        tiny_longmem(chunk_size=2).load_memory(path)
    with pytest.raises(MemoryFormatError, match="not found"):
        lm.load_memory(tmp_path / "none.safetensors")


# --------------------------------------------------------------------------------------------
# Retrieval and joint attention
# --------------------------------------------------------------------------------------------


def test_top_chunks_is_the_exact_inner_product_search():
    g = torch.Generator().manual_seed(0)
    q, means = torch.randn(4, 5, 8, generator=g), torch.randn(30, 2, 8, generator=g)
    idx = top_chunks(q, means.transpose(0, 1), 3)
    for h in range(4):
        for t in range(5):
            scores = means[:, h // 2].double() @ q[h, t].double()
            assert idx[h, t].tolist() == scores.argsort(descending=True)[:3].tolist()
    assert top_chunks(q, means[:2].transpose(0, 1), 3).shape == (4, 5, 2)  # fewer chunks than asked: all of them


def test_faiss_returns_the_same_chunks_as_torch_on_a_large_bank():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    C, Hkv, c, hd = 20000, 2, 4, 16
    keys = torch.randn(C, Hkv, c, hd, generator=g)
    valid = torch.ones(C, c, dtype=torch.bool)
    valid[::7, 3] = False
    state = LongMemState.empty(Hkv, c, hd)
    state.append_(keys, torch.randn_like(keys), valid, 1, capacity_chunks=C)
    q = torch.randn(4, 64, hd, generator=g)
    by_torch = state.search(q, 16, "torch")
    by_faiss = state.search(q, 16, "faiss")
    agree = (by_torch.sort(-1).values == by_faiss.sort(-1).values).all(-1).float().mean()
    assert agree == 1.0
    idx = state.index()
    assert torch.equal(faiss_top_chunks(idx, q, 16).sort(-1).values, top_chunks(q, idx.means, 16).sort(-1).values)


def test_auto_retrieval_uses_faiss_for_large_banks_with_the_same_answers(monkeypatch):
    pytest.importorskip("faiss")
    from latentmem.longmem import bank

    lm_t = tiny_longmem(retrieval="torch")
    lm_a = tiny_longmem(retrieval="auto", faiss_min_chunks=4)
    mem = filled(lm_t, CORPUS)
    used = []
    real = bank.faiss_top_chunks
    monkeypatch.setattr(bank, "faiss_top_chunks", lambda *a: used.append(1) or real(*a))
    a = lm_a.generate(mem, "Alice lives in", chat=False, max_new_tokens=4)
    assert used  # auto chose faiss
    assert a.token_ids == lm_t.generate(mem, "Alice lives in", chat=False, max_new_tokens=4).token_ids
    assert lm_a.score([mem], ["Paris is"], ["the capital"])[0][0] == pytest.approx(lm_t.score([mem], ["Paris is"], ["the capital"])[0][0], abs=1e-4)


def test_memory_attention_and_gate_against_a_loop():
    g = torch.Generator().manual_seed(2)
    B, H, T, M, hd = 2, 3, 4, 6, 8
    q, k, v = torch.randn(B, H, T, hd, generator=g), torch.randn(B, H, T, M, hd, generator=g), torch.randn(B, H, T, M, hd, generator=g)
    valid = torch.rand(B, H, T, M, generator=g) > 0.3
    valid[..., 0] = True
    out = memory_attention(q, k, v, valid)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                m = valid[b, h, t]
                w = ((k[b, h, t][m].double() @ q[b, h, t].double()) / math.sqrt(hd)).softmax(-1)
                torch.testing.assert_close(out[b, h, t].double(), w @ v[b, h, t][m].double(), rtol=1e-5, atol=1e-6)
    local, gate = torch.randn(B, H, T, hd, generator=g), torch.tensor([[0.5, 0.2, 0.9], [0.0, 0.0, 0.0]])
    mixed = joint_attention(local, out, gate)
    torch.testing.assert_close(mixed[0, 1], 0.8 * local[0, 1] + 0.2 * out[0, 1])
    assert torch.equal(mixed[1], local[1])  # a row without memory reads its local attention only


def test_memory_is_read_at_no_position():
    """A single token attends locally only to itself (RoPE-free), so what memory adds to the joint
    attention output is the same at position 0 and at position 500."""
    lm = tiny_longmem()
    mem = filled(lm)
    layer = lm.model.sidenet.layers[lm.config.side_memory_layer].self_attn
    x = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(0))
    read = lm.reader([mem])
    outs = []
    for p in (0, 500):
        cos, sin = lm.model.rope(torch.tensor([[p]]), x.dtype)
        outs.append(layer(x, cos, sin, None, None, None, 0, read))
    torch.testing.assert_close(outs[0], outs[1])


# --------------------------------------------------------------------------------------------
# The whole model against the reference
# --------------------------------------------------------------------------------------------


def test_the_untrained_aligned_sidenet_without_memory_is_the_backbone():
    for layers in (4, 5):  # 5: a backbone layer past the SideNet's last
        model = LongMem(tiny_longmem_config(num_hidden_layers=layers, memory_layer=2))
        randomize_(model, 4)
        model.init_sidenet_from_backbone()
        ids = torch.tensor([make_tokenizer()("Alice lives in Zurich")["input_ids"]])
        with torch.no_grad():
            torch.testing.assert_close(model(ids), model.backbone_logits(ids), rtol=1e-5, atol=1e-5)
    release = LongMem(tiny_longmem_config(cross_residual="release"))
    randomize_(release, 4)
    release.init_sidenet_from_backbone()
    with torch.no_grad():
        assert not torch.allclose(release(ids), release.backbone_logits(ids), atol=1e-2)


@pytest.mark.parametrize("residual", ["aligned", "release"])
@pytest.mark.parametrize("with_memory", [False, True])
def test_logits_match_the_float64_reference(with_memory, residual):
    lm = tiny_longmem(cross_residual=residual, num_hidden_layers=5, memory_layer=2)
    mem = filled(lm, CORPUS[:4]) if with_memory else None
    assert mem is None or mem.num_chunks > 3 * lm.config.memory_chunks  # retrieval has to choose
    prompts = ["Alice lives in Zurich and", "Paris is"]
    rows = [lm.encode(p) for p in prompts]
    from latentmem.text import left_pad

    ids, mask = left_pad(rows, 0)
    with torch.no_grad():
        logits = lm.model(ids, mask, read=lm.reader([mem, mem]))
    for b, r in enumerate(rows):
        ref = ref_logits(lm, mem, r)
        torch.testing.assert_close(logits[b, ids.shape[1] - len(r) :].double(), ref, rtol=1e-4, atol=1e-4)


def test_decoding_retrieves_at_every_step():
    """Greedy decoding over the KV cache (one retrieval per step) equals the argmax of the full
    reference recomputed over the growing sequence."""
    lm = tiny_longmem()
    mem = filled(lm, CORPUS[:4])
    prompt = "The meeting was"
    g = lm.generate(mem, prompt, chat=False, max_new_tokens=5)
    seq = lm.encode(prompt)
    for tok in g.token_ids:
        assert tok == int(ref_logits(lm, mem, seq)[-1].argmax())
        seq.append(tok)


def test_a_batch_of_banks_reads_each_row_its_own():
    lm = tiny_longmem()
    mems = [filled(lm, CORPUS[:2]), None, lm.new_memory(), filled(lm, CORPUS[3:])]
    prompts = ["Alice lives in", "Paris is", "The quick brown", "Numbers like"]
    together = lm.score(mems, prompts, ["Zurich"] * 4)
    alone = [lm.score([m], [p], ["Zurich"])[0] for m, p in zip(mems, prompts)]
    assert [s for s, _ in together] == pytest.approx([s for s, _ in alone], abs=1e-4)
    assert alone[1] == alone[1] and lm.score([None], ["Paris is"], ["Zurich"]) == lm.score([lm.new_memory()], ["Paris is"], ["Zurich"])
    gens = lm.generate_batch(mems, prompts, chat=False, max_new_tokens=3)
    assert [x.token_ids for x in gens] == [lm.generate(m, p, chat=False, max_new_tokens=3).token_ids for m, p in zip(mems, prompts)]


# --------------------------------------------------------------------------------------------
# Loading through the shared face
# --------------------------------------------------------------------------------------------


def test_load_a_llama_folder_through_the_shared_face(tmp_path):
    import transformers

    import latentmem

    tok = make_tokenizer()
    hf_cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    lm = latentmem.load(tmp_path / "m", design="longmem", capacity_tokens=1024)
    assert lm.design == "longmem" and lm.config.memory_layer == 2 and lm.config.capacity_chunks == 256
    ids = lm.encode("Paris is the capital of France")
    with torch.no_grad():
        torch.testing.assert_close(lm.backbone_logits(ids), hf(torch.tensor([ids])).logits[0], rtol=1e-4, atol=1e-4)
    mem = lm.new_memory()
    lm.inject(mem, CORPUS[1])
    assert lm.info(mem).details["gate"] == [0.5] * 4
    assert lm.generate(mem, "Paris is", chat=False, max_new_tokens=2).token_ids
    with pytest.raises(TypeError, match="unknown config fields"):
        latentmem.load(tmp_path / "m", design="longmem", chunk_sise=2)


@pytest.mark.default_model
def test_the_default_model_loads_and_reads_its_bank():
    import latentmem

    lm = latentmem.load(design="longmem")
    assert (lm.config.memory_layer, lm.config.side_layers, lm.config.side_memory_layer) == (21, 15, 10)
    mem = lm.new_memory()
    lm.inject(mem, "The launch moved to 14 March, after the board meeting in Oslo.")
    g = lm.generate(mem, "Question: When is the launch? Answer:", chat=False, max_new_tokens=8)
    assert g.token_ids and lm.info(mem).used_units == math.ceil(len(lm.encode("The launch moved to 14 March, after the board meeting in Oslo.")) / 4)


def test_the_store_forgets_in_place_and_verifies_against_a_replay(tmp_path):
    from latentmem.store import MemoryStore

    lm = tiny_longmem()
    with MemoryStore(tmp_path / "store", lm) as store:
        store.create("u", seed=0)
        store.inject("u", list(CORPUS[:4]))
        report = store.forget("u", 2)
        assert report.replayed == 0  # exact in place: nothing replayed
        assert store.verify("u").ok
        never = lm.new_memory()
        for i in (1, 3, 4):
            lm.inject(never, CORPUS[i - 1], injection_id=i)
        assert store.memory("u").equal(never)


def test_the_recipe_trains_only_the_sidenet_segment_by_segment_and_exports_small_weights(tmp_path):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from latentmem.train.config import TrainConfig
    from latentmem.train.data import TrainData
    from latentmem.train.engine import train
    from latentmem.train.longmem import document_batch

    lm = tiny_longmem()
    backbone = {k: v.clone() for k, v in lm.model.state_dict().items() if not k.startswith("sidenet.")}
    docs = [lm.encode(" ".join(CORPUS[i:] + CORPUS[:i])) for i in range(len(CORPUS))]
    cfg = TrainConfig(design="longmem", steps=2, batch_size=2, segment_min=8, segment_max=12, continuous_min_segments=3,
                      lora_r=4, lr=1e-2, warmup_steps=0, out_dir=str(tmp_path / "run"), checkpoint_every=0, progress=False,
                      export=str(tmp_path / "longmem.safetensors"), text_data=[], qa_data=[], device="cpu")
    batch = document_batch(cfg, TrainData(docs=docs), 5)
    assert batch.segments == document_batch(cfg, TrainData(docs=docs), 5).segments and len(batch.segments) == 3
    out = train(cfg, model=lm.model, tokenizer=lm.tokenizer, data=TrainData(docs=docs))
    assert len(out["losses"]) == 2 and all(math.isfinite(x) for x in out["losses"])
    assert all(n.startswith("sidenet.") for n in out["trained"]) and any(n.endswith("memory_bias") for n in out["trained"])
    for k, v in out["model"].state_dict().items():
        if k in backbone:
            assert torch.equal(v, backbone[k]), k  # the backbone stayed frozen
    exported = load_file(str(tmp_path / "longmem.safetensors"))
    assert exported and all(k.startswith("sidenet.") for k in exported)
    # the export applied to a fresh copy of the untrained model gives the trained model's outputs
    from latentmem.longmem.checkpoint import apply_trained_weights
    from latentmem.train.longmem import document_loss

    fresh = tiny_longmem().model
    record = apply_trained_weights(fresh, tmp_path / "longmem.safetensors")
    assert record["tensors"] == len(exported)
    with torch.no_grad():
        trained = document_loss(out["model"].eval(), batch, 0)[0]
        applied = document_loss(fresh, batch, 0)[0]
        untrained = document_loss(tiny_longmem().model, batch, 0)[0]
    assert float(applied) == pytest.approx(float(trained), abs=1e-4) and float(applied) != pytest.approx(float(untrained), abs=1e-4)


def test_info_and_health_report_the_bank():
    lm = tiny_longmem()
    mem = lm.new_memory()
    assert lm.info(mem).used_units == 0 and lm.info(mem).details["read_state_bytes"] == 0
    first, snap = lm.health(mem)
    assert first["nonfinite"] == 0 and first["drift"] is None
    lm.inject(mem, CORPUS[0])
    h1, snap = lm.health(mem, snap)
    lm.inject(mem, CORPUS[1])
    h2, _ = lm.health(mem, snap, since_injection=1)
    n1, n2 = (math.ceil(len(lm.encode(t)) / 4) for t in CORPUS[:2])
    assert h1["rewritten_since_last_check"] == 1.0 and h2["rewritten_since_last_check"] == pytest.approx(n2 / (n1 + n2))
    assert h2["replaced_since_start"] == pytest.approx(n2 / (n1 + n2)) and h2["drift"] > 0 and h2["mean_norm"] > 0
    info = lm.info(mem)
    d = info.details
    assert info.unit == "bank chunk" and info.capacity_units == 1024 and d["capacity_tokens"] == 4096
    assert d["stored_tokens"] == sum(len(lm.encode(t)) for t in CORPUS[:2]) and d["read_state_bytes"] > d["read_cache_bytes"] > 0
    assert lm.diff(lm.new_memory(), mem)["added_by_injection"] == {1: n1, 2: n2}


def test_no_nan_gradient_from_rows_without_memory():
    lm = tiny_longmem()
    mems = [filled(lm), None]
    ids = torch.tensor([lm.encode("Alice lives in Zurich")] * 2)
    logits = lm.model(ids, read=lm.reader(mems))
    logits.sum().backward()
    grads = [p.grad for p in lm.model.sidenet.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
