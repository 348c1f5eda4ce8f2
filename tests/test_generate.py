"""Generation: the KV-cache decode against full forward passes, greedy decoding against a plain
argmax loop, stop strings, streaming, sampling and its parameters, the default prompt form and
the repetition guard."""

from __future__ import annotations

import pytest
import torch
from conftest import filled_memory, make_tokenizer, tiny_lm, tiny_model

import latentmem.generate
from latentmem.generate import RepetitionGuard, SamplingParams, TextStream, repetition_stop, sample_next
from latentmem.text import PLAIN_QA, is_question, plain_prompt
from latentmem.backbone import KVCache

torch.set_num_threads(1)  # tiny tensors: extra threads only fight over the shared CPU

TIGHT = dict(rtol=1e-5, atol=1e-5)  # the same float32 maths, summed in another order
PROMPTS = ["Where does Alice live?", "The meeting was moved to", "Numbers like 42"]


def argmax_loop(lm, memory, prompt: str, steps: int) -> list[int]:
    """Greedy decoding the slow way: a full forward over the whole sequence for every token."""
    ids = lm.encode(prompt)
    pool = None if memory is None else memory.logical_memory()[None]
    eos = {lm.config.eos_token_id, lm.tokenizer.eos_token_id}
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(lm.model(torch.tensor([ids + out]), memory=pool)[0, -1].argmax())
            if token in eos:
                break
            out.append(token)
    return out


# --------------------------------------------------------------------------------------------
# The KV cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["all-read-memory", "padded-and-mixed", "no-memory"])
@torch.no_grad()
def test_kv_cache_decoding_equals_a_full_forward_at_every_step(case):
    model = tiny_model(seed=1)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    pools = torch.randn(3, cfg.num_hidden_layers, cfg.num_memory_tokens, cfg.hidden_size, generator=g)
    ids = torch.randint(0, cfg.vocab_size, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    prefix = model.memory_prefix(pools, True)
    if case == "padded-and-mixed":  # rows of 6, 4 and 1 tokens; the last row's pool is empty
        mask[1, :2] = mask[2, :5] = False
        prefix = model.memory_prefix(pools, torch.tensor([True, True, False]))
    elif case == "no-memory":
        prefix = None
    steps = 5
    cache = KVCache(prefix, 3, 6 + steps, cfg, ids.device, model.dtype)
    logits = model(ids, mask, cache=cache)
    torch.testing.assert_close(logits, model(ids, mask, memory=prefix), **TIGHT)
    for _ in range(steps):
        token = logits[:, -1].argmax(-1)
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], 1)
        logits = model(token[:, None], cache=cache)
        torch.testing.assert_close(logits[:, -1], model(ids, mask, memory=prefix)[:, -1], **TIGHT)


def test_kv_cache_capacity_is_enforced():
    model = tiny_model()
    cache = KVCache(None, 1, 4, model.config, "cpu", model.dtype)
    with torch.no_grad(), pytest.raises(RuntimeError, match="capacity 4 exceeded"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


# --------------------------------------------------------------------------------------------
# generate / stream
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_memory", [True, False])
def test_greedy_generate_equals_an_argmax_loop_over_full_forwards(with_memory):
    lm = tiny_lm(seed=2)
    mem = filled_memory(lm) if with_memory else None
    for prompt in PROMPTS:
        expected = argmax_loop(lm, mem, prompt, 10)
        got = lm.generate(mem, prompt, chat=False, max_new_tokens=10, repeat_limit=0)  # decoding alone: no loop guard
        assert got.token_ids == expected and expected
        # the text is the tokens' text, less a multi-byte character still incomplete at the end
        assert got.text == lm.tokenizer.decode(expected, skip_special_tokens=True).rstrip("\ufffd")
        assert got.prompt_tokens == len(lm.encode(prompt))
        assert got.finish_reason == ("length" if len(expected) == 10 else "stop")


def test_eos_ends_a_row_and_is_not_emitted():
    lm = tiny_lm(seed=2)
    mem = filled_memory(lm)
    full = lm.generate(mem, PROMPTS[0], chat=False, max_new_tokens=10).token_ids
    other = lm.generate(mem, PROMPTS[1], chat=False, max_new_tokens=10)
    i = next(i for i in range(1, len(full)) if full[i] not in full[:i])
    lm.config.eos_token_id = full[i]  # make the i-th greedy token an end-of-sequence token
    got = lm.generate(mem, PROMPTS[0], chat=False, max_new_tokens=10)
    assert got.token_ids == full[:i] and got.finish_reason == "stop"
    # in a batch the other row keeps going (up to its own first eos, if any)
    stop_at = other.token_ids.index(full[i]) if full[i] in other.token_ids else len(other.token_ids)
    batch = lm.generate_batch([mem, mem], PROMPTS[:2], chat=False, max_new_tokens=10)
    assert batch[0].token_ids == full[:i] and batch[1].token_ids == other.token_ids[:stop_at]


def test_stop_strings_end_generation_and_are_never_emitted():
    lm = tiny_lm(seed=3)
    mem = filled_memory(lm)
    full = lm.generate(mem, PROMPTS[0], chat=False, max_new_tokens=24).text
    assert len(full) > 12
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    got = lm.generate(mem, PROMPTS[0], chat=False, max_new_tokens=24, stop=[stop, "never appears"])
    assert got.text == expected and got.finish_reason == "stop"
    pieces = list(lm.stream(mem, PROMPTS[0], chat=False, max_new_tokens=24, stop=stop))
    assert "".join(pieces) == expected
    shown = ""
    for piece in pieces:  # text once shown is never taken back
        shown += piece
        assert expected.startswith(shown)


def test_a_paused_stream_leaves_the_callers_autograd_alone():
    """Between two pieces the caller's own code runs (a server's other requests, a training
    step): it must not find itself in inference mode with gradients off."""
    lm = tiny_lm()
    pieces = lm.stream(filled_memory(lm), PROMPTS[0], chat=False, max_new_tokens=8)
    next(pieces)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    x = torch.ones(2, requires_grad=True)
    assert (x * 2).requires_grad
    list(pieces)


def test_text_stream_holds_back_a_possible_stop_string_across_tokens():
    tok = make_tokenizer()
    ids = tok("Paris is the capital of France", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, ["s the c"])
    shown = ""
    for i in ids:
        shown += stream.push(i)
        assert "s the c" not in shown and "Paris i".startswith(shown[: len("Paris i")])
    shown += stream.finish()
    assert stream.stopped and stream.text == shown == "Paris i"


@pytest.mark.parametrize("chat", [None, False])
def test_stream_concatenation_equals_generate_text(chat):
    lm = tiny_lm(seed=4)
    for mem in (filled_memory(lm), None):
        for prompt in PROMPTS:
            text = lm.generate(mem, prompt, chat=chat, max_new_tokens=16).text
            assert "".join(lm.stream(mem, prompt, chat=chat, max_new_tokens=16)) == text


def test_chat_messages_equal_the_templated_string_prompt():
    lm = tiny_lm()
    as_messages = lm.generate(None, [{"role": "user", "content": PROMPTS[0]}], max_new_tokens=6)
    as_string = lm.generate(None, PROMPTS[0], chat=True, max_new_tokens=6)  # the template is opt-in
    assert as_messages.token_ids == as_string.token_ids
    assert as_string.prompt_tokens > len(lm.encode(PROMPTS[0]))


def test_zero_new_tokens_and_empty_prompts():
    lm = tiny_lm()
    got = lm.generate(None, PROMPTS[0], chat=False, max_new_tokens=0)
    assert (got.text, got.token_ids, got.finish_reason) == ("", [], "length")
    with pytest.raises(ValueError, match="prompt is empty"):
        lm.generate(None, "", chat=False)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_sampling_with_a_seed_is_reproducible():
    lm = tiny_lm(seed=5)
    mem = filled_memory(lm)

    def sample(**kw):
        return lm.generate(mem, PROMPTS[0], chat=False, max_new_tokens=16, temperature=1.5, **kw).token_ids

    assert sample(seed=1) == sample(seed=1)
    assert sample(seed=1) != sample(seed=2)
    # keeping a single candidate is greedy decoding, whatever the temperature
    greedy = lm.generate(mem, PROMPTS[0], chat=False, max_new_tokens=16).token_ids
    assert sample(seed=3, top_k=1) == greedy
    assert sample(seed=3, top_p=1e-9) == greedy


def test_top_k_and_top_p_restrict_the_candidates():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log()
    g = torch.Generator().manual_seed(0)

    def draws(**kw):
        params = SamplingParams(temperature=1.0, **kw)
        return {int(sample_next(logits, params, g)) for _ in range(300)}

    assert draws() == {0, 1, 2, 3}
    assert draws(top_k=2) == {1, 3}
    # top_p keeps a token while the mass before it is below top_p: 0 < 0.7, 0.5 < 0.7, 0.8 >= 0.7
    assert draws(top_p=0.7) == {1, 3}
    assert draws(top_p=0.85) == {1, 3, 2}
    assert int(sample_next(logits, SamplingParams(), None)) == 1  # temperature 0: argmax


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), "top_k must be >= 0"),
        (dict(stop=["ok", ""]), "stop strings must be non-empty"),
        (dict(repeat_ngram=0), "repeat_ngram must be >= 1"),
        (dict(repeat_limit=1), r"repeat_limit must be 0 \(off\) or >= 2"),
        (dict(repeat_limit=-1), r"repeat_limit must be 0 \(off\) or >= 2"),
    ],
)
def test_bad_sampling_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=message):  # through the public API, before any work
        tiny_lm().generate(None, PROMPTS[0], **kwargs)


def test_a_single_stop_string_may_be_given_as_str():
    assert SamplingParams(stop="END").stop == ["END"]


# --------------------------------------------------------------------------------------------
# The default prompt form (chat=None), chat=False (as given) and chat=True (the template)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,prompt,stops",
    [
        ("When is the launch?", "Question: When is the launch? Answer:", ["\n"]),
        ("  When is the launch?  ", "Question: When is the launch? Answer:", ["\n"]),  # the question is stripped
        ("Question: When is the launch? Answer:", "Question: When is the launch? Answer:", ["\n"]),  # already in the form
        ("Context: Oslo.\nQuestion: Where? Answer:", "Context: Oslo.\nQuestion: Where? Answer:", ["\n"]),
        ("The launch moved to", "The launch moved to", []),  # not a question: a continuation, as given
        ("Is it?\nOr not?", "Is it?\nOr not?", []),  # several lines: as given
    ],
)
def test_plain_prompt_wraps_a_bare_question_and_stops_its_answer_at_a_newline(text, prompt, stops):
    assert plain_prompt(text) == (prompt, stops)
    assert is_question(text) == (prompt != text and prompt == PLAIN_QA.format(question=text.strip()))


def test_the_default_asks_a_question_in_the_trained_form_and_chat_false_as_given():
    lm = tiny_lm(seed=2)
    q = PROMPTS[0]
    default = lm.generate(None, q, max_new_tokens=4)
    assert lm.chat_prompt(q, None) == f"Question: {q} Answer:"
    assert default.prompt_tokens == len(lm.encode(f"Question: {q} Answer:"))
    assert default.token_ids == lm.generate(None, f"Question: {q} Answer:", chat=False, max_new_tokens=4, stop="\n").token_ids
    assert lm.generate(None, q, chat=False, max_new_tokens=4).prompt_tokens == len(lm.encode(q))
    templated = lm.generate(None, q, chat=True, max_new_tokens=4)
    assert templated.prompt_tokens == len(lm.encode(lm.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)))
    # a continuation is read as given either way
    assert lm.generate(None, PROMPTS[1], max_new_tokens=4).token_ids == lm.generate(None, PROMPTS[1], chat=False, max_new_tokens=4).token_ids


def scripted(monkeypatch, lm, text_or_ids):
    """Make decoding emit these tokens (every row, in order), whatever the logits."""
    ids = lm.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
    calls = iter(range(10**6))

    def fake(logits, params, generator):
        i = next(calls)
        return torch.full((logits.shape[0],), ids[i % len(ids)], dtype=torch.long)

    monkeypatch.setattr(latentmem.generate, "sample_next", fake)
    return ids


def test_a_question_answer_ends_at_its_first_newline(monkeypatch):
    lm = tiny_lm()
    answer = " Zurich\nQuestion: Paris is the capital"
    scripted(monkeypatch, lm, answer)
    got = lm.generate(None, "Where does Alice live?", max_new_tokens=12)
    assert (got.text, got.finish_reason) == (" Zurich", "stop")
    scripted(monkeypatch, lm, answer)
    assert "".join(lm.stream(None, "Where does Alice live?", max_new_tokens=12)) == " Zurich"
    scripted(monkeypatch, lm, answer)  # as given (chat=False), nothing stops at the newline
    assert "\n" in lm.generate(None, "Where does Alice live?", chat=False, max_new_tokens=12).text


# --------------------------------------------------------------------------------------------
# The repetition guard
# --------------------------------------------------------------------------------------------


def test_the_repetition_guard_on_hand_built_token_sequences():
    # "14 March, 14 March, ..." as SmolLM2 tokenises it: ' ', '1', '4', ' March', ',' repeated
    loop = [220, 33, 36, 5186, 11] * 6
    # the 4-gram (' ', '1', '4', ' March') occurs at tokens 0-3, 5-8 and 10-13: stop after 14
    assert repetition_stop(loop, n=4, limit=3) == 14
    assert repetition_stop(loop, n=4, limit=2) == 9
    assert repetition_stop(loop, n=4, limit=0) is None  # off
    # "14 March, 15 March, 16 March, ...": the digits count up, (' March', ',', ' ', '1') repeats
    counting = [t for d in range(4, 10) for t in (220, 33, 32 + d, 5186, 11)]
    assert repetition_stop(counting, n=4, limit=3) == 17  # (March , " " 1) ends at 6, 11, 16: "... 16 March, 1"
    # a token repeated: 'a a a a a a' -> (a, a, a, a) at 0-3, 1-4, 2-5
    assert repetition_stop([7] * 10, n=4, limit=3) == 6
    # a fluent answer: no 4-gram three times (one occurs twice)
    fluent = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 9, 10, 11, 12]
    assert repetition_stop(fluent, n=4, limit=3) is None
    assert repetition_stop(fluent, n=4, limit=2) == 10
    # shorter than n: never
    assert repetition_stop([5, 5, 5], n=4, limit=2) is None
    guard = RepetitionGuard(2, 3)
    assert [guard.push(t) for t in [1, 2, 1, 2, 1, 2]] == [False, False, False, False, False, True]


def test_generation_stops_a_loop_with_finish_reason_repetition(monkeypatch):
    lm = tiny_lm()
    cycle = lm.encode(" 14 March,")
    scripted(monkeypatch, lm, cycle)
    n = len(cycle)
    got = lm.generate(None, "The launch moved to", max_new_tokens=60)
    assert got.finish_reason == "repetition"
    assert got.token_ids == (cycle * 10)[: repetition_stop(cycle * 10)]  # the guard's stop, no later token
    assert len(got.token_ids) < 4 * n and got.text.startswith(" 14 March, 14 March")
    scripted(monkeypatch, lm, cycle)
    assert "".join(lm.stream(None, "The launch moved to", max_new_tokens=60)) == got.text
    scripted(monkeypatch, lm, cycle)
    off = lm.generate(None, "The launch moved to", max_new_tokens=60, repeat_limit=0)
    assert off.finish_reason == "length" and len(off.token_ids) == 60
    # in a batch the guard ends the row that loops; a row that stops first keeps its own reason
    scripted(monkeypatch, lm, cycle)
    batch = lm.generate_batch([None, None], ["Where does the launch move?", "The launch moved to"], max_new_tokens=60, stop=["4 M"])
    assert [g.finish_reason for g in batch] == ["stop", "stop"]
    scripted(monkeypatch, lm, cycle)
    batch = lm.generate_batch([None, None], ["When is it?", "The launch moved to"], max_new_tokens=60)
    assert [g.finish_reason for g in batch] == ["repetition", "repetition"] and batch[0].token_ids == got.token_ids


def test_the_guard_ends_rows_early_but_never_changes_their_tokens():
    """On a real (tiny) model: the guarded answer is a prefix of the unguarded one."""
    lm = tiny_lm(seed=2)
    mem = filled_memory(lm)
    for prompt in PROMPTS:
        free = lm.generate(mem, prompt, chat=False, max_new_tokens=40, repeat_limit=0)
        guarded = lm.generate(mem, prompt, chat=False, max_new_tokens=40)
        assert free.token_ids[: len(guarded.token_ids)] == guarded.token_ids
        stop = repetition_stop(free.token_ids)
        if stop is not None and stop < len(free.token_ids):
            assert (guarded.finish_reason, len(guarded.token_ids)) == ("repetition", stop)
        else:
            assert guarded.token_ids == free.token_ids
