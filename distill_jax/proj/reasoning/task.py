"""A verifiable reasoning task: multi-digit arithmetic with a step-by-step trace.

A problem is ``Q:347+598=``; its completion in the **trace** format works the
digits from the least significant one, writing each step's carry, then the
answer::

    <think>7+8+0=15;4+9+1=14;3+5+1=09;</think>A:945<eos>

(step ``x+y+c=cs``: digits x and y, carry in c, two-digit sum whose first
digit is the carry out). Multiplication by one digit (``op="mul"``) writes
``7*8+0=56;`` steps the same way. In the **answer** format the completion is
just ``A:945<eos>``. Why chain-of-thought matters here: the answer is written
most-significant digit first, and its first digit depends on the carry chain
through *every* lower digit; the trace turns that into one local step per
digit and the answer into copying digits back in reverse.

* :class:`Tokenizer`: characters plus ``<pad> <bos> <eos> <think> </think>``
  tokens (ids 0-4).
* :func:`verify`: exact check of the final answer (what the R1 recipe's
  rejection sampling keeps); the trace itself is not checked.
  :func:`verify_trace`: the answer and every step of the trace.
* :func:`make_splits`: ``train``, a disjoint held-out ``test`` with the same
  operand lengths, and ``ood`` with longer operands; deterministic from a seed.
  :func:`make_study_splits`: train / val / test, and an ``ood`` split of
  operand combinations that no other split holds.
* :func:`encode_examples`: right-padded ``inputs``/``targets`` arrays and a
  ``loss_mask`` that is 1 exactly on the completion's tokens (answer, trace,
  ``<eos>``): prompt and padding carry no loss.
* :func:`prompt_arrays` / :func:`completion_batch`: left-padded prompts for
  generation and the training batch of prompts plus generated completions.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Literal, Sequence

import jax.numpy as jnp
import numpy as np

Format = Literal["trace", "answer"]
Op = Literal["add", "mul"]

PAD, BOS, EOS, THINK, END_THINK = 0, 1, 2, 3, 4
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<think>", "</think>")
CHARACTERS = "0123456789+*=;:QA"
FORMATS = ("trace", "answer")
OPS = {"add": "+", "mul": "*"}

__all__ = [
    "PAD", "BOS", "EOS", "THINK", "END_THINK", "Tokenizer", "Problem", "TOKENIZER",
    "trace", "completion", "verify", "verify_trace", "parse_answer", "make_problems", "make_splits",
    "make_study_splits", "operand_lengths",
    "encode_examples", "prompt_arrays", "completion_batch", "max_completion_len", "token_splits",
]


class Tokenizer:
    """Character-level tokenizer with five special tokens (``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ...)."""

    def __init__(self, characters: str = CHARACTERS):
        self.vocab = list(SPECIAL_TOKENS) + list(characters)
        self.ids = {token: i for i, token in enumerate(self.vocab)}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special tokens are written as ``<eos>`` etc. Unknown characters are a ValueError."""
        ids = []
        for piece in self._split.split(text):
            if piece in self.ids and piece in SPECIAL_TOKENS:
                ids.append(self.ids[piece])
                continue
            for char in piece:
                if char not in self.ids:
                    raise ValueError(f"character {char!r} is not in the vocabulary {CHARACTERS!r}.")
                ids.append(self.ids[char])
        return ids

    def decode(self, ids: Iterable[int], *, stop_at_eos: bool = False, skip_pad: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == PAD and skip_pad:
                continue
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(self.vocab)}).")
            out.append(self.vocab[i])
            if stop_at_eos and i == EOS:
                break
        return "".join(out)


TOKENIZER = Tokenizer()


@dataclasses.dataclass(frozen=True)
class Problem:
    """``a <op> b``; for ``mul``, ``b`` is a single digit."""

    a: int
    b: int
    op: Op = "add"

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {sorted(OPS)}, got {self.op!r}.")
        if self.a < 0 or self.b < 0:
            raise ValueError(f"operands must be >= 0, got {self.a}, {self.b}.")
        if self.op == "mul" and self.b > 9:
            raise ValueError(f"mul multiplies by one digit; b={self.b}.")

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "add" else self.a * self.b

    @property
    def prompt(self) -> str:
        return f"Q:{self.a}{OPS[self.op]}{self.b}="


def _steps(problem: Problem) -> list[str]:
    digits_a = [int(d) for d in reversed(str(problem.a))]
    if problem.op == "add":
        digits_b = [int(d) for d in reversed(str(problem.b))]
        width = max(len(digits_a), len(digits_b))
        digits_a += [0] * (width - len(digits_a))
        digits_b += [0] * (width - len(digits_b))
    steps, carry = [], 0
    for i, x in enumerate(digits_a):
        if problem.op == "add":
            total = x + digits_b[i] + carry
            steps.append(f"{x}+{digits_b[i]}+{carry}={total:02d};")
        else:
            total = x * problem.b + carry
            steps.append(f"{x}*{problem.b}+{carry}={total:02d};")
        carry = total // 10
    return steps


def trace(problem: Problem) -> str:
    """The ground-truth chain of thought, ``<think>...</think>``."""
    return "<think>" + "".join(_steps(problem)) + "</think>"


def completion(problem: Problem, fmt: Format = "trace") -> str:
    """What the model must write after the prompt: ``[trace]A:<answer><eos>``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}.")
    return (trace(problem) if fmt == "trace" else "") + f"A:{problem.answer}<eos>"


_ANSWER = re.compile(r"A:(\d+)<eos>")


def parse_answer(text: str) -> int | None:
    """The integer after the last ``A:`` when the completion ends right after it with ``<eos>``; else None."""
    text = text.split("<eos>", 1)[0] + "<eos>" if "<eos>" in text else text
    match = None
    for match in _ANSWER.finditer(text):
        pass
    if match is None or match.end() != len(text):
        return None
    digits = match.group(1)
    if len(digits) > 1 and digits[0] == "0":
        return None  # leading zeros are not the canonical answer
    if len(digits) > 4000:
        return None  # no problem of this task has such an answer (and int() refuses > 4300 digits)
    return int(digits)


def verify(problem: Problem, generated: str | Sequence[int]) -> bool:
    """Whether a completion (text, or token ids) ends with the exact correct answer ``A:<n><eos>``.

    Everything up to the first ``<eos>`` counts; the trace is not checked, as
    in R1's rule-based accuracy reward.
    """
    # Padding is not skipped: "A:9<pad>45<eos>" is not the answer 945.
    text = generated if isinstance(generated, str) else TOKENIZER.decode(generated, stop_at_eos=True, skip_pad=False)
    return parse_answer(text) == problem.answer


def verify_trace(problem: Problem, generated: str | Sequence[int]) -> bool:
    """Whether the answer **and every step of the trace** are right (a process verifier).

    Each ``x+y+c=cs;`` step must name the right digits and carry and add
    them correctly, in order, and the answer must follow. The trace of a
    problem is unique here, so this is an exact match with the ground-truth
    completion up to the first ``<eos>``.
    """
    text = generated if isinstance(generated, str) else TOKENIZER.decode(generated, stop_at_eos=True, skip_pad=False)
    if "<eos>" in text:
        text = text.split("<eos>", 1)[0] + "<eos>"
    return text == completion(problem, "trace")


def operand_lengths(problem: Problem) -> tuple[int, int]:
    """Digit counts of the two operands."""
    return len(str(problem.a)), len(str(problem.b))


def _random_operand(rng: np.random.Generator, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10**digits))


def make_problems(
    rng: np.random.Generator,
    n: int,
    *,
    op: Op = "add",
    min_digits: int = 1,
    max_digits: int = 3,
    exclude: set[Problem] | None = None,
    lengths: Sequence[tuple[int, int]] | None = None,
    accept=None,
) -> list[Problem]:
    """``n`` distinct problems; each operand's digit count uniform in [min_digits, max_digits].

    ``lengths`` (``add`` only): the allowed ``(digits of a, digits of b)``
    pairs instead, one drawn uniformly per problem. ``accept``: a predicate
    a problem must pass to be drawn.
    """
    if lengths is not None and (op != "add" or not lengths):
        raise ValueError("lengths: a non-empty list of (digits a, digits b) pairs, for op='add' only.")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}.")
    exclude = set() if exclude is None else exclude
    seen: set[Problem] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"could not draw {n} distinct problems with {min_digits}-{max_digits} digits; ask for fewer.")
        if lengths is not None:
            digits_a, digits_b = lengths[int(rng.integers(len(lengths)))]
            problem = Problem(_random_operand(rng, int(digits_a)), _random_operand(rng, int(digits_b)), op)
            if problem not in seen and problem not in exclude and (accept is None or accept(problem)):
                seen.add(problem)
                out.append(problem)
            continue
        a = _random_operand(rng, int(rng.integers(min_digits, max_digits + 1)))
        if op == "add":
            b = _random_operand(rng, int(rng.integers(min_digits, max_digits + 1)))
        else:
            b = int(rng.integers(2, 10))
        problem = Problem(a, b, op)
        if problem in seen or problem in exclude or (accept is not None and not accept(problem)):
            continue
        seen.add(problem)
        out.append(problem)
    return out


def make_splits(
    seed: int,
    *,
    num_train: int,
    num_test: int,
    num_ood: int,
    op: Op = "add",
    max_digits: int = 3,
    ood_digits: int | None = None,
) -> dict[str, list[Problem]]:
    """``train`` and a disjoint ``test`` (1..max_digits digits), ``ood`` (exactly ``ood_digits``, default max+1)."""
    rng = np.random.default_rng(seed)
    ood_digits = max_digits + 1 if ood_digits is None else ood_digits
    test = make_problems(rng, num_test, op=op, max_digits=max_digits)
    train = make_problems(rng, num_train, op=op, max_digits=max_digits, exclude=set(test))
    ood = make_problems(rng, num_ood, op=op, min_digits=ood_digits, max_digits=ood_digits)
    return {"train": train, "test": test, "ood": ood}


def make_study_splits(
    seed: int,
    *,
    num_train: int,
    num_val: int,
    num_test: int,
    num_ood: int,
    max_digits: int = 3,
    held_out: Sequence[tuple[int, int]] = (),
    held_out_units: Sequence[tuple[int, int]] = ((3, 8), (8, 3), (6, 6)),
) -> dict[str, list[Problem]]:
    """Disjoint addition splits for the study: ``train``, ``val``, ``test`` and ``ood``.

    ``ood`` holds the combinations no other split has: problems whose
    operand-length pair is in ``held_out``, or whose units digits
    ``(a % 10, b % 10)`` are in ``held_out_units`` (such a pair of digits
    is still added at the other positions in training; only the first step
    of the trace is new). ``train``/``val``/``test`` hold the rest, up to
    ``max_digits`` digits.
    """
    pairs = [(i, j) for i in range(1, max_digits + 1) for j in range(1, max_digits + 1)]
    held_out = [tuple(map(int, p)) for p in held_out]
    unknown = [p for p in held_out if p not in pairs]
    if unknown:
        raise ValueError(f"held_out pairs {unknown} are not operand lengths of 1..{max_digits} digits.")
    seen = [p for p in pairs if p not in held_out]
    if not seen:
        raise ValueError("held_out leaves no operand-length pair to train on.")
    units = {tuple(map(int, u)) for u in held_out_units}
    if any(not (0 <= x <= 9 and 0 <= y <= 9) for x, y in units):
        raise ValueError(f"held_out_units must be pairs of digits 0-9, got {sorted(units)}.")
    if not (held_out or units) and num_ood:
        raise ValueError("an ood split needs held_out length pairs or held_out_units digit pairs.")
    is_ood = lambda p: operand_lengths(p) in held_out or (p.a % 10, p.b % 10) in units
    rng = np.random.default_rng(seed)
    inside = lambda p: not is_ood(p)
    test = make_problems(rng, num_test, lengths=seen, accept=inside)
    val = make_problems(rng, num_val, lengths=seen, exclude=set(test), accept=inside)
    train = make_problems(rng, num_train, lengths=seen, exclude=set(test) | set(val), accept=inside)
    ood = make_problems(rng, num_ood, lengths=pairs, accept=is_ood) if num_ood else []
    return {"train": train, "val": val, "test": test, "ood": ood}


def max_completion_len(max_digits: int, *, op: Op = "add", fmt: Format = "trace") -> int:
    """Tokens of the longest completion (``<eos>`` included) for operands of up to ``max_digits`` digits."""
    widest = Problem(10**max_digits - 1, 10**max_digits - 1 if op == "add" else 9, op)
    return len(TOKENIZER.encode(completion(widest, fmt)))


def max_prompt_len(max_digits: int, *, op: Op = "add") -> int:
    """Tokens of the longest prompt, ``<bos>`` included."""
    widest = Problem(10**max_digits - 1, 10**max_digits - 1 if op == "add" else 9, op)
    return 1 + len(TOKENIZER.encode(widest.prompt))


def encode_examples(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """Right-padded next-token arrays for ``<bos> prompt completion`` rows.

    Returns numpy arrays, all ``[N, length - 1]``: ``inputs`` and ``targets``
    (the sequence shifted by one), ``valid`` (the input is a real token) and
    ``loss_mask`` (float32, 1 exactly where the *target* is a completion
    token). ``length`` (default: the longest row) must hold every row.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions.")
    rows, prompt_lens = [], []
    for prompt, done in zip(prompts, completions):
        prompt_ids = [BOS] + TOKENIZER.encode(prompt)
        rows.append(prompt_ids + TOKENIZER.encode(done))
        prompt_lens.append(len(prompt_ids))
    longest = max((len(r) for r in rows), default=2)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a row has {longest} tokens, more than length={length}.")
    tokens = np.full((len(rows), length), PAD, np.int32)
    completion_mask = np.zeros((len(rows), length), bool)
    for i, (row, p) in enumerate(zip(rows, prompt_lens)):
        tokens[i, : len(row)] = row
        completion_mask[i, p : len(row)] = True
    real = np.arange(length)[None, :] < np.array([len(r) for r in rows]).reshape(-1, 1)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "valid": real[:, :-1],
        "loss_mask": completion_mask[:, 1:].astype(np.float32),
    }


def encode_problems(problems: Sequence[Problem], fmt: Format = "trace", *, length: int | None = None) -> dict[str, np.ndarray]:
    """:func:`encode_examples` of the problems' ground-truth completions in format ``fmt``."""
    return encode_examples([p.prompt for p in problems], [completion(p, fmt) for p in problems], length=length)


def prompt_arrays(problems: Sequence[Problem], *, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ``<bos> prompt`` ids ``[N, length]`` and their ``valid`` mask, for generation."""
    rows = [[BOS] + TOKENIZER.encode(p.prompt) for p in problems]
    longest = max((len(r) for r in rows), default=1)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a prompt has {longest} tokens, more than length={length}.")
    tokens = np.full((len(rows), length), PAD, np.int32)
    valid = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        tokens[i, length - len(row) :] = row
        valid[i, length - len(row) :] = True
    return tokens, valid


def completion_batch(prompts, prompt_valid, generated, lengths) -> dict:
    """The training batch of left-padded prompts followed by generated completions (jnp; works under jit).

    ``generated`` ``[B, N]`` and ``lengths`` ``[B]`` as returned by
    :func:`distill_jax.generation.generate`. ``loss_mask`` is 1 on the
    generated tokens only (end token included), 0 on prompt and padding.
    """
    prompt_len = prompts.shape[1]
    sequence = jnp.concatenate([prompts, generated.astype(prompts.dtype)], axis=1)
    generated_valid = jnp.arange(generated.shape[1])[None, :] < lengths[:, None]
    seq_valid = jnp.concatenate([jnp.asarray(prompt_valid, bool), generated_valid], axis=1)
    target_is_generated = jnp.arange(1, sequence.shape[1])[None, :] >= prompt_len
    return {
        "inputs": sequence[:, :-1],
        "targets": sequence[:, 1:],
        "valid": seq_valid[:, :-1],
        "loss_mask": (seq_valid[:, 1:] & target_is_generated).astype(jnp.float32),
    }


def token_splits(
    seed: int,
    *,
    num_train: int,
    num_val: int = 0,
    num_test: int = 0,
    op: Op = "add",
    max_digits: int = 3,
    fmt: Format = "trace",
) -> dict[str, dict[str, np.ndarray]]:
    """Disjoint train / val / test splits as the training core's token arrays.

    Each split is ``{"inputs", "valid", "label", "mask"}`` (``label``: the
    next tokens; ``mask``: 1 on completion tokens), every row padded to one
    length that holds the widest problem, so every split compiles to one shape.
    """
    rng = np.random.default_rng(seed)
    test = make_problems(rng, num_test, op=op, max_digits=max_digits)
    val = make_problems(rng, num_val, op=op, max_digits=max_digits, exclude=set(test))
    train = make_problems(rng, num_train, op=op, max_digits=max_digits, exclude=set(test) | set(val))
    length = max_prompt_len(max_digits, op=op) + max_completion_len(max_digits, op=op, fmt=fmt)
    out = {}
    for name, problems in (("train", train), ("val", val), ("test", test)):
        if not problems:
            continue
        arrays = encode_problems(problems, fmt, length=length)
        out[name] = {"inputs": arrays["inputs"], "valid": arrays["valid"], "label": arrays["targets"], "mask": arrays["loss_mask"]}
    return out
