"""Tests of the arithmetic reasoning task: tokenizer, traces, verifier, splits, loss masks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill_jax.proj.reasoning import task as R


problems = st.one_of(
    st.builds(R.Problem, st.integers(0, 99_999), st.integers(0, 99_999), st.just("add")),
    st.builds(R.Problem, st.integers(0, 99_999), st.integers(0, 9), st.just("mul")),
)
formats = st.sampled_from(R.FORMATS)


@given(problems, formats)
@settings(max_examples=200)
def test_verifier_accepts_every_ground_truth_completion_as_text_and_ids(problem, fmt):
    text = R.completion(problem, fmt)
    assert R.verify(problem, text)
    assert R.verify(problem, R.TOKENIZER.encode(text) + [R.PAD] * 3)
    assert R.TOKENIZER.decode(R.TOKENIZER.encode(problem.prompt + text)) == problem.prompt + text


@given(problems, formats, st.data())
@settings(max_examples=200)
def test_verifier_rejects_a_corrupted_answer_or_a_truncated_completion(problem, fmt, data):
    text = R.completion(problem, fmt)
    answer = str(problem.answer)
    start = text.rindex("A:") + 2
    i = data.draw(st.integers(0, len(answer) - 1))
    wrong_digit = data.draw(st.sampled_from([d for d in "0123456789" if d != answer[i]]))
    corrupted = text[: start + i] + wrong_digit + text[start + i + 1 :]
    assert not R.verify(problem, corrupted)
    ids = R.TOKENIZER.encode(text)
    cut = data.draw(st.integers(0, len(ids) - 1))
    assert not R.verify(problem, ids[:cut])  # no <eos> yet, or answer unfinished
    assert not R.verify(problem, text.replace("<eos>", "7<eos>"))


def test_the_trace_carries_through_every_digit():
    assert R.completion(R.Problem(347, 598)) == "<think>7+8+0=15;4+9+1=14;3+5+1=09;</think>A:945<eos>"
    assert R.completion(R.Problem(999, 1)) == "<think>9+1+0=10;9+0+1=10;9+0+1=10;</think>A:1000<eos>"
    assert R.completion(R.Problem(347, 8, "mul")) == "<think>7*8+0=56;4*8+5=37;3*8+3=27;</think>A:2776<eos>"
    assert R.completion(R.Problem(12, 34), "answer") == "A:46<eos>"


def test_splits_are_deterministic_disjoint_and_ood_is_longer():
    a = R.make_splits(3, num_train=200, num_test=50, num_ood=20)
    b = R.make_splits(3, num_train=200, num_test=50, num_ood=20)
    assert a == b
    assert not set(a["train"]) & set(a["test"])
    assert len(set(a["train"])) == 200
    assert all(len(str(p.a)) <= 3 and len(str(p.b)) <= 3 for p in a["train"] + a["test"])
    assert all(len(str(p.a)) == 4 and len(str(p.b)) == 4 for p in a["ood"])
    assert R.make_splits(4, num_train=200, num_test=50, num_ood=20) != a


@given(st.lists(problems, min_size=1, max_size=6), formats)
def test_loss_mask_covers_exactly_the_completion_tokens(batch, fmt):
    arrays = R.encode_problems(batch, fmt)
    assert arrays["inputs"].shape == arrays["targets"].shape == arrays["loss_mask"].shape
    for i, problem in enumerate(batch):
        mask = arrays["loss_mask"][i] > 0
        completion_ids = R.TOKENIZER.encode(R.completion(problem, fmt))
        assert mask.sum() == len(completion_ids)
        np.testing.assert_array_equal(arrays["targets"][i][mask], completion_ids)
        prompt_len = 1 + len(R.TOKENIZER.encode(problem.prompt))
        assert not mask[: prompt_len - 1].any()  # targets 0..P-2 are prompt tokens
        assert np.all(arrays["targets"][i][~mask & ~arrays["valid"][i]] == R.PAD)


def test_completion_batch_masks_only_generated_tokens_before_the_end():
    prompts, valid = R.prompt_arrays([R.Problem(1, 2), R.Problem(345, 678)])
    generated = np.array([[5, 6, R.EOS, 0], [7, 8, 9, 10]], np.int32)
    batch = R.completion_batch(prompts, valid, generated, np.array([3, 4]))
    mask = np.asarray(batch["loss_mask"]) > 0
    np.testing.assert_array_equal(np.asarray(batch["targets"])[0][mask[0]], [5, 6, R.EOS])
    np.testing.assert_array_equal(np.asarray(batch["targets"])[1][mask[1]], [7, 8, 9, 10])
    np.testing.assert_array_equal(np.asarray(batch["valid"])[0, : prompts.shape[1]], valid[0])


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match="vocabulary"):
        R.TOKENIZER.encode("Q:1-2=")
    with pytest.raises(ValueError, match="format"):
        R.completion(R.Problem(1, 2), "cot")
    with pytest.raises(ValueError, match="one digit"):
        R.Problem(12, 34, "mul")
    with pytest.raises(ValueError, match="length"):
        R.encode_problems([R.Problem(123, 456)], length=5)
