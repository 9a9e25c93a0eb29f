"""The hybrid loss against references written plainly here, from the textbook formulas."""

import dataclasses
import itertools
import math
import warnings

import pytest
import torch

from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounterWithBackend

import config as config_lib
from slm_ensembles.losses import (CompiledLossTerms, LossSettings, Projection, SparseTarget, bucket_log_probs,
                                  chunked_hybrid_loss_sums, compile_loss_terms, divergence_sum, hybrid_loss_sums,
                                  hybrid_loss_terms, loss_chunks, next_token_targets, nll_sum, predictor_mask,
                                  sparse_divergence_sum, teacher_divergence_sum)


def reference_kl(p, q):
    """KL(p || q) for probability vectors, summed term by term."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()) if pi > 0)


def softmax(z, temperature=1.0):
    return torch.softmax(z.double() / temperature, dim=-1)


@pytest.fixture
def logit_pair():
    torch.manual_seed(0)
    return torch.randn(5, 11), torch.randn(5, 11)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_and_reverse_kl_equal_the_textbook_sums(logit_pair, temperature):
    teacher, model = logit_pair
    p, q = softmax(teacher, temperature), softmax(model, temperature)
    forward = sum(reference_kl(p[i], q[i]) for i in range(len(p)))
    reverse = sum(reference_kl(q[i], p[i]) for i in range(len(p)))
    assert divergence_sum(teacher, model, "forward_kl", temperature).item() == pytest.approx(forward, rel=1e-5)
    assert divergence_sum(teacher, model, "reverse_kl", temperature).item() == pytest.approx(reverse, rel=1e-5)
    assert forward != pytest.approx(reverse, rel=1e-3)  # the directions really differ on these inputs


@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_generalized_jsd_equals_its_definition(logit_pair, beta):
    teacher, model = logit_pair
    p, q = softmax(teacher), softmax(model)
    expected = 0.0
    for i in range(len(p)):
        m = beta * p[i] + (1 - beta) * q[i]
        expected += beta * reference_kl(p[i], m) + (1 - beta) * reference_kl(q[i], m)
    assert divergence_sum(teacher, model, "jsd", beta=beta).item() == pytest.approx(expected, rel=1e-5)


def test_jsd_at_one_half_is_symmetric_and_bounded(logit_pair):
    teacher, model = logit_pair
    forward = divergence_sum(teacher, model, "jsd", beta=0.5)
    backward = divergence_sum(model, teacher, "jsd", beta=0.5)
    assert forward.item() == pytest.approx(backward.item(), rel=1e-5)
    assert 0 < forward.item() <= len(teacher) * math.log(2)


def test_divergences_vanish_for_identical_distributions(logit_pair):
    teacher, _ = logit_pair
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert divergence_sum(teacher, teacher.clone(), kind).item() == pytest.approx(0.0, abs=1e-5)


def test_unknown_divergence_is_refused(logit_pair):
    with pytest.raises(ValueError, match="unknown divergence 'tvd'"):
        divergence_sum(*logit_pair, kind="tvd")


def test_a_rounds_loss_settings_come_from_the_run_config_and_its_frozen_members():
    config = config_lib.build_config("test", overrides=dict(
        combine="additive", alpha="0.3", temperature="2.0", divergence="jsd", jsd_beta="0.2", nll_target="student",
        eta="0.5", kl_scale="ensemble_size"))
    assert LossSettings.for_round(config, [1.0, 1.0], num_frozen=2) == LossSettings(
        alpha=0.3, temperature=2.0, divergence="jsd", jsd_beta=0.2, nll_target="student", combine="additive",
        mixture_weights=(0.5, 1.0, 1.0), kl_scale=3.0)  # the student's coefficient eta, then the members'
    plain = dataclasses.replace(config, combine="logits", kl_scale="none")
    assert LossSettings.for_round(plain, None, num_frozen=2) == LossSettings(
        alpha=0.3, temperature=2.0, divergence="jsd", jsd_beta=0.2, nll_target="student", combine="logits")


def test_a_first_additive_member_trains_through_its_own_coefficient_alone(logit_pair):
    student, teacher = logit_pair
    targets = torch.tensor([1, 4, 0, 7, 2])
    alone = hybrid_loss_sums(student, teacher, [], targets, LossSettings(combine="additive", mixture_weights=(0.5,)))
    scaled = hybrid_loss_sums(0.5 * student, teacher, [], targets, LossSettings(combine="logits"))
    assert alone.total.item() == pytest.approx(scaled.total.item(), rel=1e-6)
    unscaled = hybrid_loss_sums(student, teacher, [], targets, LossSettings())
    assert alone.total.item() != pytest.approx(unscaled.total.item())


def test_predictor_mask_and_targets_shift_by_one():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, 8]])
    assert predictor_mask(labels).tolist() == [[False, True, True, False, False], [True, False, False, True, False]]
    assert next_token_targets(labels).tolist() == [5, 6, 7, 8]


def naive_hybrid(student, teacher, members, targets, alpha, temperature):
    """alpha * T^2 * KL(teacher || mean-logit mixture) + (1 - alpha) * NLL(mixture), summed, term by term."""
    mixture = (student + sum(members)) / (len(members) + 1) if members else student
    p_teacher, p_mix_t = softmax(teacher, temperature), softmax(mixture, temperature)
    p_mix = softmax(mixture)
    total = 0.0
    for i in range(len(targets)):
        total += alpha * temperature**2 * reference_kl(p_teacher[i], p_mix_t[i])
        total += (1 - alpha) * -math.log(p_mix[i, targets[i]].item())
    return total


@pytest.mark.parametrize("num_members", [0, 1, 3])
@pytest.mark.parametrize("alpha,temperature", [(0.5, 1.0), (0.8, 2.0), (0.0, 1.0), (1.0, 1.0)])
def test_hybrid_loss_matches_the_naive_reference(num_members, alpha, temperature):
    torch.manual_seed(num_members)
    student, teacher = torch.randn(6, 13), torch.randn(6, 13)
    members = [torch.randn(6, 13) for _ in range(num_members)]
    targets = torch.randint(0, 13, (6,))
    sums = hybrid_loss_sums(student, teacher, members, targets, LossSettings(alpha=alpha, temperature=temperature))
    expected = naive_hybrid(student, teacher, members, targets, alpha, temperature)
    assert sums.total.item() == pytest.approx(expected, rel=1e-5)
    assert sums.num_tokens == 6


def test_with_no_members_it_is_plain_distillation():
    torch.manual_seed(1)
    student, teacher, targets = torch.randn(4, 9), torch.randn(4, 9), torch.randint(0, 9, (4,))
    sums = hybrid_loss_sums(student, teacher, [], targets, LossSettings(alpha=0.3, temperature=2.0))
    plain = 0.3 * 4.0 * divergence_sum(teacher, student, temperature=2.0) + 0.7 * nll_sum(student, targets)
    assert sums.total.item() == pytest.approx(plain.item(), rel=1e-6)


def test_nll_on_the_student_alone_ignores_the_members():
    torch.manual_seed(2)
    student, targets = torch.randn(4, 9), torch.randint(0, 9, (4,))
    members = [torch.randn(4, 9)]
    sums = hybrid_loss_sums(student, None, members, targets, LossSettings(alpha=0.0, nll_target="student"))
    assert sums.total.item() == pytest.approx(nll_sum(student, targets).item(), rel=1e-6)
    on_mixture = hybrid_loss_sums(student, None, members, targets, LossSettings(alpha=0.0))
    assert on_mixture.total.item() != pytest.approx(sums.total.item(), rel=1e-3)


def test_probability_averaging_uses_the_mixture_of_probabilities():
    torch.manual_seed(3)
    student, teacher, member = torch.randn(3, 7), torch.randn(3, 7), torch.randn(3, 7)
    targets = torch.randint(0, 7, (3,))
    sums = hybrid_loss_sums(student, teacher, [member], targets, LossSettings(alpha=1.0, combine="probs"))
    p_mix = (softmax(student) + softmax(member)) / 2
    expected = sum(reference_kl(softmax(teacher)[i], p_mix[i]) for i in range(3))
    assert sums.total.item() == pytest.approx(expected, rel=1e-5)


def test_the_chunked_loss_gives_no_gradient_to_teacher_and_members_even_when_they_require_one():
    """chunked_hybrid_loss_sums (the trainer's loss) computes the frozen models' logits without a graph itself, so
    teacher and members that require gradients get none, and the student's gradients are those of plain autograd
    with them detached. (hybrid_loss_sums leaves that to its caller: its teacher and members must not require any.)"""
    torch.manual_seed(4)
    vocab, width, positions = 8, 6, 5
    student_head = torch.nn.Linear(width, vocab)
    student_hidden = torch.randn(positions, width, requires_grad=True)
    frozen_heads = [torch.nn.Linear(width, vocab) for _ in range(3)]  # teacher, members: all requiring gradients
    frozen_hidden = [torch.randn(positions, width, requires_grad=True) for _ in range(3)]
    targets = torch.randint(0, vocab, (positions,))
    frozen = [Projection(hidden, head) for hidden, head in zip(frozen_hidden, frozen_heads)]
    sums = chunked_hybrid_loss_sums(Projection(student_hidden, student_head), frozen[0], frozen[1:], targets,
                                    LossSettings(), chunk_size=2)
    sums.total.backward()
    assert student_hidden.grad.abs().sum() > 0 and student_head.weight.grad.abs().sum() > 0
    assert all(tensor.grad is None for tensor in [*frozen_hidden, *(p for h in frozen_heads for p in h.parameters())])
    gradients = [student_hidden.grad.clone(), student_head.weight.grad.clone()]
    student_hidden.grad = student_head.weight.grad = None
    frozen_logits = [head(hidden).detach() for hidden, head in zip(frozen_hidden, frozen_heads)]
    reference = hybrid_loss_sums(student_head(student_hidden), frozen_logits[0], frozen_logits[1:], targets,
                                 LossSettings())
    reference.total.backward()
    assert sums.total.item() == pytest.approx(reference.total.item(), rel=1e-6)
    torch.testing.assert_close(gradients, [student_hidden.grad, student_head.weight.grad], atol=1e-6, rtol=1e-5)


def test_loss_is_computed_in_fp32_from_bf16_logits():
    torch.manual_seed(5)
    student, teacher = torch.randn(4, 9), torch.randn(4, 9)
    targets = torch.randint(0, 9, (4,))
    full = hybrid_loss_sums(student, teacher, [], targets, LossSettings())
    half = hybrid_loss_sums(student.bfloat16(), teacher.bfloat16(), [], targets, LossSettings())
    assert half.total.dtype == torch.float32
    assert half.total.item() == pytest.approx(full.total.item(), rel=2e-2)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_size", [0, 1, 4, 5, 64])
def test_chunked_loss_equals_plain_autograd_on_the_full_logits_in_value_and_gradients(divergence, chunk_size):
    torch.manual_seed(6)
    vocab, width, positions = 23, 8, 17
    student_head = torch.nn.Linear(width, vocab)  # with a bias: it gets its gradient too
    # Frozen, as the trainer's teacher and members are.
    teacher_head = torch.nn.Linear(width, vocab).requires_grad_(False)
    member_head = torch.nn.Linear(width, vocab).requires_grad_(False)
    student_hidden = torch.randn(positions, width, requires_grad=True)
    teacher_hidden, member_hidden = torch.randn(positions, width), torch.randn(positions, width)
    targets = torch.randint(0, vocab, (positions,))
    settings = LossSettings(alpha=0.6, temperature=1.5, divergence=divergence)
    scale = 0.37  # what the trainer's division by the step's token count does to the gradient reaching the loss

    def gradients():
        grads = [student_hidden.grad.clone(), student_head.weight.grad.clone(), student_head.bias.grad.clone()]
        student_hidden.grad, student_head.weight.grad, student_head.bias.grad = None, None, None
        return grads

    reference = hybrid_loss_sums(student_head(student_hidden), teacher_head(teacher_hidden),
                                 [member_head(member_hidden)], targets, settings)
    (reference.total * scale).backward()
    reference_gradients = gradients()
    chunked = chunked_hybrid_loss_sums(Projection(student_hidden, student_head),
                                       Projection(teacher_hidden, teacher_head),
                                       [Projection(member_hidden, member_head)], targets, settings, chunk_size)
    (chunked.total * scale).backward()
    for name in ("total", "divergence", "nll"):
        assert getattr(chunked, name).item() == pytest.approx(getattr(reference, name).item(), rel=1e-5)
    for actual, expected in zip(gradients(), reference_gradients):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert teacher_head.weight.grad is None and member_head.weight.grad is None


def test_kl_scale_multiplies_the_distillation_term_only(logit_pair):
    teacher, student = logit_pair
    member = torch.randn_like(student)
    targets = torch.tensor([1, 2, 3, 4, 5])
    plain = hybrid_loss_sums(student, teacher, [member], targets, LossSettings(alpha=0.4, temperature=2.0))
    scaled = hybrid_loss_sums(student, teacher, [member], targets,
                              LossSettings(alpha=0.4, temperature=2.0, kl_scale=2.0))
    assert scaled.divergence == pytest.approx(plain.divergence.item())
    assert scaled.total.item() == pytest.approx(2.0 * 0.4 * 4.0 * plain.divergence.item() + 0.6 * plain.nll.item(),
                                                rel=1e-6)


def test_mixture_weights_set_the_mixture_the_loss_sees(logit_pair):
    teacher, student = logit_pair
    member = torch.randn_like(student)
    targets = torch.tensor([1, 2, 3, 4, 5])
    settings = LossSettings(alpha=0.0, combine="additive", mixture_weights=(0.5, 1.0))
    sums = hybrid_loss_sums(student, teacher, [member], targets, settings)
    assert sums.nll.item() == pytest.approx(nll_sum(0.5 * student + member, targets).item(), rel=1e-6)
    alone = hybrid_loss_sums(student, teacher, [], targets, LossSettings(alpha=0.0, combine="weighted",
                                                                         mixture_weights=(1.0,)))
    assert alone.nll.item() == pytest.approx(nll_sum(student, targets).item(), rel=1e-6)


def top_k_target(teacher_logits, k, temperature):
    """A cached teacher as teacher_cache.py stores one: top-k log-probabilities at T, their ids, the tail's log-mass."""
    log_probs = torch.log_softmax(teacher_logits / temperature, dim=-1)
    top, ids = log_probs.topk(k, dim=-1)
    rest = torch.ones_like(log_probs, dtype=torch.bool).scatter(-1, ids, False)
    tail = torch.where(rest, log_probs, float("-inf")).logsumexp(dim=-1)  # -inf when k = V: an empty tail
    return SparseTarget(top, ids, tail)


MIXTURE_WEIGHTS = {"logits": None, "probs": None, "weighted": (0.5, 0.3, 0.2), "additive": (0.7, 1.0, 1.0)}


class ChunkedLossCase:
    """A student head on hidden states, a frozen teacher and two frozen members, all on the same positions."""

    scale = 0.37  # the gradient reaching the loss (the trainer divides it by the step's token count)

    def __init__(self, teacher_kind, combine, divergence, positions=17, vocab=23, width=8, temperature=1.5,
                 device="cpu"):
        torch.manual_seed(7)  # drawn on the CPU, so a CUDA case holds the same numbers
        self.student_head = torch.nn.Linear(width, vocab).to(device)
        self.member_heads = [torch.nn.Linear(width, vocab).requires_grad_(False).to(device) for _ in range(2)]
        self.student_hidden = torch.randn(positions, width).to(device).requires_grad_()
        self.member_hidden = [torch.randn(positions, width).to(device) for _ in range(2)]
        self.targets = torch.randint(0, vocab, (positions,)).to(device)
        teacher_head = torch.nn.Linear(width, vocab).requires_grad_(False).to(device)
        teacher_hidden = torch.randn(positions, width).to(device)
        if teacher_kind == "dense":
            self.teacher = Projection(teacher_hidden, teacher_head)
        else:
            k = vocab if teacher_kind == "top_k=V" else 5
            self.teacher = top_k_target(teacher_head(teacher_hidden), k, temperature)
        self.settings = LossSettings(alpha=0.6, temperature=temperature, divergence=divergence, combine=combine,
                                     mixture_weights=MIXTURE_WEIGHTS[combine])

    def members(self):
        return [Projection(hidden, head) for hidden, head in zip(self.member_hidden, self.member_heads)]

    def run(self, chunk_size, loss_terms=hybrid_loss_terms):
        """The loss sums and the gradients of the student's hidden states and head (weight and bias)."""
        sums = chunked_hybrid_loss_sums(Projection(self.student_hidden, self.student_head), self.teacher,
                                        self.members(), self.targets, self.settings, chunk_size, loss_terms)
        (sums.total * self.scale).backward()
        return sums, self.gradients()

    def reference(self):
        """The same from plain autograd through the full [N, V] logits."""
        teacher = self.teacher
        if isinstance(teacher, Projection):
            teacher = teacher.head(teacher.hidden).detach()
        members = [member.head(member.hidden).detach() for member in self.members()]
        sums = hybrid_loss_sums(self.student_head(self.student_hidden), teacher, members, self.targets, self.settings)
        (sums.total * self.scale).backward()
        return sums, self.gradients()

    def gradients(self):
        parameters = [self.student_hidden, self.student_head.weight, self.student_head.bias]
        gradients = [parameter.grad.clone() for parameter in parameters]
        for parameter in parameters:
            parameter.grad = None
        return gradients


def assert_same_loss_and_gradients(actual, expected):
    (sums, gradients), (ref_sums, ref_gradients) = actual, expected
    for name in ("total", "divergence", "nll"):
        assert getattr(sums, name).item() == pytest.approx(getattr(ref_sums, name).item(), rel=1e-5, abs=1e-5)
    for gradient, ref_gradient in zip(gradients, ref_gradients, strict=True):
        torch.testing.assert_close(gradient, ref_gradient, atol=1e-5, rtol=1e-5)


TEACHER_KINDS = ["dense", "top_k=V", "top_k<V"]
# Every teacher target and combine mode under forward KL and JSD, and under reverse KL (whose terms are weighted by
# the mixture's probabilities, not the teacher's) every teacher target with combine=probs and combine=additive.
CHUNKED_CASES = [*itertools.product(TEACHER_KINDS, list(MIXTURE_WEIGHTS), ["forward_kl", "jsd"]),
                 *itertools.product(TEACHER_KINDS, ["probs", "additive"], ["reverse_kl"])]


@pytest.mark.parametrize("teacher_kind,combine,divergence", CHUNKED_CASES)
def test_chunked_loss_equals_plain_autograd_for_every_teacher_target_and_combine_mode(teacher_kind, combine,
                                                                                     divergence):
    case = ChunkedLossCase(teacher_kind, combine, divergence)
    reference = case.reference()
    assert reference[0].divergence.item() > 0 and all(gradient.abs().sum() > 0 for gradient in reference[1])
    for chunk_size in (0, 4, 5):  # one chunk; last chunks of 1 and 2 positions
        assert_same_loss_and_gradients(case.run(chunk_size), reference)


@pytest.mark.parametrize("teacher_kind,combine,divergence", [("dense", "logits", "forward_kl"),
                                                              ("top_k<V", "probs", "jsd"),
                                                              ("dense", "weighted", "reverse_kl")])
def test_compiled_loss_equals_the_eager_loss_and_compiles_once_for_every_chunk_size(teacher_kind, combine,
                                                                                      divergence):
    case = ChunkedLossCase(teacher_kind, combine, divergence)
    counter = CompileCounterWithBackend("aot_eager")  # traces and differentiates as inductor would, fast on CPU
    compiled = compile_loss_terms(backend=counter)
    eager = case.run(chunk_size=5)  # 17 positions: chunks of 5, 5, 5 and a last one of 2
    assert_same_loss_and_gradients(case.run(chunk_size=5, loss_terms=compiled), eager)
    assert_same_loss_and_gradients(case.run(chunk_size=4, loss_terms=compiled), case.run(chunk_size=4))
    whole = case.run(chunk_size=0)
    assert_same_loss_and_gradients(case.run(chunk_size=0, loss_terms=compiled), whole)
    # The compiled function ran, and its row dimension is dynamic: chunks of 5, 4, 3 and 17 rows share one graph
    # (chunk_size=4 leaves a last chunk of 1 row, a size torch.compile specialises: that adds one).
    assert counter.frame_count == 2
    assert compiled.failure is None  # the compiled code gave those results: nothing fell back to the eager loss


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("teacher_kind", ["dense", "top_k<V"])
def test_the_loss_compiled_by_inductor_on_cuda_under_bf16_autocast_equals_the_eager_loss(teacher_kind):
    """What compile_loss=auto turns on for a paper run: inductor on the GPU, inside training's bf16 autocast."""
    case = ChunkedLossCase(teacher_kind, "logits", "forward_kl", positions=300, vocab=4096, width=64,
                           device="cuda")
    compiled = compile_loss_terms()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = case.run(chunk_size=128)
        sums, gradients = case.run(chunk_size=128, loss_terms=compiled)
    assert compiled.failure is None  # inductor compiled and ran it: nothing fell back
    for name in ("total", "divergence", "nll"):
        assert getattr(sums, name).item() == pytest.approx(getattr(eager[0], name).item(), rel=1e-3)
    for gradient, eager_gradient in zip(gradients, eager[1], strict=True):
        torch.testing.assert_close(gradient, eager_gradient, atol=1e-3, rtol=1e-2)


def fallback_warnings(record):
    return [warning for warning in record if "the compiled loss failed" in str(warning.message)]


def test_a_loss_that_fails_to_compile_falls_back_to_the_eager_loss_with_one_warning_and_no_retry():
    case = ChunkedLossCase("dense", "logits", "forward_kl")
    compile_attempts = []

    def failing_backend(graph, example_inputs):
        compile_attempts.append(graph)
        raise RuntimeError("boom")

    compiled = compile_loss_terms(backend=failing_backend)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for chunk_size in (5, 4, 0):  # later steps, and new row counts that would otherwise recompile
            assert_same_loss_and_gradients(case.run(chunk_size, loss_terms=compiled), case.run(chunk_size))
    assert len(compile_attempts) == 1
    (warning,) = fallback_warnings(record)
    assert issubclass(warning.category, RuntimeWarning)
    assert "BackendCompilerFailed" in str(warning.message) and "boom" in str(warning.message)


def forward_failing_on_second_run(runs):
    """A backend whose compiled forward works once and then fails, as a kernel failing on the device would."""
    def backend(graph, example_inputs):
        def run(*args):
            runs.append(len(runs) + 1)
            if len(runs) == 2:
                raise RuntimeError("kernel failed")
            return graph.forward(*args)
        return run
    return backend


def failing_backward_compile(runs):
    """A backend whose forward compiles and runs, but whose backward fails to compile (when it first runs)."""
    def forward_compiler(graph, example_inputs):
        def run(args):
            runs.append(len(runs) + 1)
            return graph(*args)
        run._boxed_call = True  # AOTAutograd's calling convention: one list of arguments
        return run

    def backward_compiler(graph, example_inputs):
        raise RuntimeError("backward failed to compile")

    return aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler)


@pytest.mark.parametrize("failing_backend,failure,failing_step,compiled_runs", [
    (forward_failing_on_second_run, "kernel failed", 2, 2),  # works at step 1, fails at step 2's forward
    (failing_backward_compile, "backward failed to compile", 1, 1),  # fails in step 1's gradients
])
def test_a_compiled_loss_that_fails_when_run_falls_back_from_that_step_on(failing_backend, failure, failing_step,
                                                                         compiled_runs):
    case = ChunkedLossCase("dense", "logits", "forward_kl")
    runs = []
    compiled = compile_loss_terms(backend=failing_backend(runs))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in (1, 2, 3):
            # One chunk a step, so that the compiled function runs once a step, each step the same shapes.
            assert_same_loss_and_gradients(case.run(chunk_size=0, loss_terms=compiled), case.run(chunk_size=0))
            assert len(fallback_warnings(record)) == (step >= failing_step), step
    assert len(runs) == compiled_runs  # nothing ran compiled after the failure
    assert failure in str(fallback_warnings(record)[0].message)


def test_an_error_the_eager_loss_raises_too_is_raised_and_the_compiled_loss_stays_on():
    case = ChunkedLossCase("dense", "logits", "forward_kl")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = compile_loss_terms(backend=counter)
    settings = case.settings
    case.settings = dataclasses.replace(settings, divergence="no_such_divergence")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="unknown divergence 'no_such_divergence'"):
            case.run(chunk_size=0, loss_terms=compiled)
        case.settings = settings
        assert_same_loss_and_gradients(case.run(chunk_size=0, loss_terms=compiled), case.run(chunk_size=0))
    assert fallback_warnings(record) == [] and compiled.failure is None
    assert counter.frame_count == 1  # the good inputs ran compiled


def test_a_fast_loss_that_fails_gives_way_to_the_eager_one_with_every_argument_passed_on():
    """CompiledLossTerms around a plain function (no torch.compile): the first call's failure is recomputed eagerly,
    with the same student, teacher, members, targets, settings, chunks and gradient norms."""
    case = ChunkedLossCase("top_k<V", "weighted", "jsd")
    calls = []

    def fails_once(*args):
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("kernel failed")
        return hybrid_loss_terms(*args)

    def sums_and_gradients(loss_terms, chunk_size):
        sums = chunked_hybrid_loss_sums(Projection(case.student_hidden, case.student_head), case.teacher,
                                        case.members(), case.targets, case.settings, chunk_size, loss_terms,
                                        term_gradient_norms=True)
        (sums.total * case.scale).backward()
        return sums, case.gradients()

    fast = CompiledLossTerms(fails_once)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for chunk_size in (5, 0):
            (sums, gradients), (eager, eager_gradients) = (sums_and_gradients(fast, chunk_size),
                                                           sums_and_gradients(hybrid_loss_terms, chunk_size))
            assert sums.num_tokens == eager.num_tokens == 17
            for name in ("total", "divergence", "nll", "kl_gradient_norm_sq", "nll_gradient_norm_sq"):
                torch.testing.assert_close(getattr(sums, name), getattr(eager, name), rtol=1e-5, atol=1e-6)
            for gradient, eager_gradient in zip(gradients, eager_gradients, strict=True):
                torch.testing.assert_close(gradient, eager_gradient, rtol=1e-5, atol=1e-6)
    (warning,) = fallback_warnings(record)
    assert calls == [0] and warning.category is RuntimeWarning and str(warning.message) == (
        "the compiled loss failed (RuntimeError: kernel failed); that micro-batch was recomputed with the eager loss, "
        "which is used from now on")
    for teacher_kind in ("top_k<V", "dense", None):  # the fast path itself, while it works, whatever the teacher
        working, case = CompiledLossTerms(hybrid_loss_terms), ChunkedLossCase(teacher_kind or "dense", "logits", "jsd")
        if teacher_kind is None:  # alpha = 0: no teacher at all
            case.teacher, case.settings = None, dataclasses.replace(case.settings, alpha=0.0)
        assert_same_loss_and_gradients(case.run(4, loss_terms=working), case.run(4))
        assert working.failure is None, teacher_kind


def test_the_loss_chunks_cover_every_position_once_in_order():
    assert loss_chunks(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 9)]
    assert loss_chunks(3, 1) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert loss_chunks(3, 3) == loss_chunks(3, 8) == loss_chunks(3, 0) == [slice(0, 3)]


def test_the_teachers_divergence_takes_the_settings_temperature_and_beta_dense_or_cached(logit_pair):
    teacher, mixture = logit_pair
    settings = LossSettings(alpha=0.5, temperature=2.0, divergence="jsd", jsd_beta=0.2)
    expected = divergence_sum(teacher, mixture, "jsd", temperature=2.0, beta=0.2)
    assert expected != pytest.approx(divergence_sum(teacher, mixture, "jsd", temperature=2.0).item())  # beta counts
    assert expected != pytest.approx(divergence_sum(teacher, mixture, "jsd", beta=0.2).item())  # and T
    torch.testing.assert_close(teacher_divergence_sum(teacher, mixture, settings), expected)
    cached = top_k_target(teacher, teacher.shape[-1], temperature=2.0)  # every token kept: equal to the dense one
    torch.testing.assert_close(teacher_divergence_sum(cached, mixture, settings), expected)


def test_the_cached_divergence_is_the_forward_kl_at_temperature_1_unless_told_otherwise(logit_pair):
    teacher, model = logit_pair
    ids = torch.tensor([[0, 3]] * teacher.shape[0])
    torch.testing.assert_close(bucket_log_probs(model, ids), bucket_log_probs(model, ids, temperature=1.0))
    assert not torch.allclose(bucket_log_probs(model, ids), bucket_log_probs(model, ids, temperature=2.0))
    cached = top_k_target(teacher, 3, temperature=1.0)
    forward = sparse_divergence_sum(cached.log_probs, cached.indices, cached.tail_log_prob, model, "forward_kl")
    assert sparse_divergence_sum(cached.log_probs, cached.indices, cached.tail_log_prob, model) == forward
    assert forward != sparse_divergence_sum(cached.log_probs, cached.indices, cached.tail_log_prob, model,
                                            "reverse_kl")


class CountingHead:
    """An output head that counts its calls."""

    def __init__(self, head):
        self.head, self.calls = head, 0

    def __call__(self, hidden):
        self.calls += 1
        return self.head(hidden)


def no_gradient_in_evaluation(*args, **kwargs):
    raise AssertionError("an evaluation took gradients")


@pytest.mark.parametrize("num_members", [0, 3])
@pytest.mark.parametrize("chunk_size,num_chunks", [(0, 1), (5, 4), (17, 1), (4, 5)])
@pytest.mark.parametrize("term_gradient_norms", [False, True])
def test_each_head_runs_once_per_chunk_in_a_whole_step(num_members, chunk_size, num_chunks, term_gradient_norms,
                                                       monkeypatch):
    """Forward and backward: every frozen head and the student's run once per chunk (no recomputation)."""
    torch.manual_seed(10)
    vocab, width, positions = 23, 8, 17
    student_linear = torch.nn.Linear(width, vocab)
    student = Projection(torch.randn(positions, width, requires_grad=True), CountingHead(student_linear),
                         module=student_linear)
    frozen_heads = [torch.nn.Linear(width, vocab).requires_grad_(False) for _ in range(num_members + 1)]
    frozen = [Projection(torch.randn(positions, width), CountingHead(head)) for head in frozen_heads]
    targets = torch.randint(0, vocab, (positions,))
    sums = chunked_hybrid_loss_sums(student, frozen[0], frozen[1:], targets, LossSettings(), chunk_size,
                                    term_gradient_norms=term_gradient_norms)
    sums.total.backward()
    assert student.hidden.grad.abs().sum() > 0 and student_linear.weight.grad.abs().sum() > 0
    assert student.head.calls == num_chunks
    assert [projection.head.calls for projection in frozen] == [num_chunks] * (num_members + 1)

    with torch.no_grad(), monkeypatch.context() as patch:  # evaluation: the same, and no gradient is taken
        patch.setattr(torch.autograd, "grad", no_gradient_in_evaluation)
        evaluated = chunked_hybrid_loss_sums(student, frozen[0], frozen[1:], targets, LossSettings(), chunk_size)
    assert not evaluated.total.requires_grad and evaluated.num_tokens == sums.num_tokens == positions
    assert evaluated.total.item() == pytest.approx(sums.total.item(), rel=1e-6)
    assert [projection.head.calls for projection in (student, *frozen)] == [2 * num_chunks] * (num_members + 2)


def test_a_head_tied_to_the_input_embeddings_gets_both_gradients():
    """The head's weight is the embedding table: its gradient is the head's part plus the embedding lookup's (which
    reaches it through the hidden states), as plain autograd through the full logits gives."""
    torch.manual_seed(11)
    vocab, width, positions = 19, 6, 13
    embedding = torch.nn.Embedding(vocab, width)
    head = torch.nn.Linear(width, vocab, bias=False)
    head.weight = embedding.weight
    body = torch.nn.Linear(width, width)
    token_ids, targets = torch.randint(0, vocab, (positions,)), torch.randint(0, vocab, (positions,))
    teacher_logits = torch.randn(positions, vocab)
    settings = LossSettings(alpha=0.5, temperature=2.0)

    def step(loss_of_hidden):
        embedding.zero_grad(set_to_none=True)
        body.zero_grad(set_to_none=True)
        hidden = torch.tanh(body(embedding(token_ids)))
        loss_of_hidden(hidden).backward()
        return [embedding.weight.grad.clone(), body.weight.grad.clone(), body.bias.grad.clone()]

    teacher = top_k_target(teacher_logits, 5, settings.temperature)
    reference = step(lambda hidden: hybrid_loss_sums(head(hidden), teacher, [], targets, settings).total)
    chunked = step(lambda hidden: chunked_hybrid_loss_sums(Projection(hidden, head), teacher, [], targets, settings,
                                                           chunk_size=4).total)
    for actual, expected in zip(chunked, reference):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # Both parts are really there: the head's part alone differs from the sum.
    embedding.zero_grad(set_to_none=True)
    hybrid_loss_sums(head(torch.tanh(body(embedding(token_ids))).detach()), teacher, [], targets,
                     settings).total.backward()
    assert not torch.allclose(embedding.weight.grad, reference[0], atol=1e-4)


@pytest.mark.parametrize("teacher_kind,combine,divergence", [("dense", "logits", "forward_kl"),
                                                              ("top_k<V", "probs", "jsd"),
                                                              ("dense", "additive", "forward_kl")])
def test_each_terms_gradient_norm_equals_plain_autograd_of_that_term(teacher_kind, combine, divergence):
    case = ChunkedLossCase(teacher_kind, combine, divergence)
    teacher = case.teacher.head(case.teacher.hidden).detach() if isinstance(case.teacher, Projection) else case.teacher
    members = [member.head(member.hidden).detach() for member in case.members()]
    terms = hybrid_loss_terms(case.student_head(case.student_hidden), teacher, members, case.targets, case.settings)
    expected = [torch.autograd.grad(term, case.student_hidden, retain_graph=True)[0].pow(2).sum().item()
                for term in (terms.kl_term, terms.nll_term)]
    assert min(expected) > 0

    reference = case.reference()
    sums = chunked_hybrid_loss_sums(Projection(case.student_hidden, case.student_head), case.teacher, case.members(),
                                    case.targets, case.settings, chunk_size=5, term_gradient_norms=True)
    assert sums.kl_gradient_norm_sq.item() == pytest.approx(expected[0], rel=1e-5)
    assert sums.nll_gradient_norm_sq.item() == pytest.approx(expected[1], rel=1e-5)
    (sums.total * case.scale).backward()  # the total's gradients stay those of plain autograd
    assert_same_loss_and_gradients((sums, case.gradients()), reference)

    unasked = chunked_hybrid_loss_sums(Projection(case.student_hidden, case.student_head), case.teacher,
                                       case.members(), case.targets, case.settings, chunk_size=5)
    assert unasked.kl_gradient_norm_sq is None and unasked.nll_gradient_norm_sq is None


def test_with_alpha_0_the_distillation_terms_gradient_norm_is_0():
    torch.manual_seed(12)
    head = torch.nn.Linear(8, 23)
    hidden = torch.randn(9, 8, requires_grad=True)
    sums = chunked_hybrid_loss_sums(Projection(hidden, head), None, [], torch.randint(0, 23, (9,)),
                                    LossSettings(alpha=0.0), chunk_size=4, term_gradient_norms=True)
    assert sums.kl_gradient_norm_sq.item() == 0 and sums.nll_gradient_norm_sq.item() > 0


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_under_autocast_the_heads_run_in_bf16_the_loss_in_fp32_and_gradients_keep_their_inputs_dtypes(hidden_dtype):
    torch.manual_seed(13)
    vocab, width, positions = 29, 16, 11
    student_head = torch.nn.Linear(width, vocab)
    teacher_head = torch.nn.Linear(width, vocab).requires_grad_(False)
    hidden = torch.randn(positions, width).to(hidden_dtype).requires_grad_()
    teacher_hidden = torch.randn(positions, width)
    targets = torch.randint(0, vocab, (positions,))
    settings = LossSettings(alpha=0.5, temperature=2.0)
    logit_dtypes = []

    def recording_head(rows):
        logits = student_head(rows)
        logit_dtypes.append(logits.dtype)
        return logits

    def gradients():
        grads = [hidden.grad, student_head.weight.grad, student_head.bias.grad]
        hidden.grad, student_head.weight.grad, student_head.bias.grad = None, None, None
        return grads

    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = hybrid_loss_sums(student_head(hidden), teacher_head(teacher_hidden), [], targets, settings)
    reference.total.backward()  # outside autocast, as the Trainer does
    expected = gradients()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums = chunked_hybrid_loss_sums(Projection(hidden, recording_head, module=student_head),
                                        Projection(teacher_hidden, teacher_head), [], targets, settings, chunk_size=4)
    sums.total.backward()
    assert logit_dtypes == [torch.bfloat16] * 3 and sums.total.dtype == torch.float32
    assert sums.total.item() == pytest.approx(reference.total.item(), rel=1e-3)
    for actual, wanted in zip(gradients(), expected):
        assert actual.dtype == wanted.dtype
        torch.testing.assert_close(actual.float(), wanted.float(), atol=1e-2, rtol=2e-2)
    assert expected[0].dtype == hidden_dtype and expected[1].dtype == torch.float32


@pytest.mark.parametrize("chunk_size", [4, 0])  # several chunks, and one
def test_a_head_using_trainable_tensors_its_projection_does_not_hold_is_refused(chunk_size):
    torch.manual_seed(14)
    head = torch.nn.Linear(8, 23)
    hidden = torch.randn(9, 8, requires_grad=True)
    targets = torch.randint(0, 23, (9,))
    unlisted = Projection(hidden, lambda rows: head(rows))  # a plain function: its parameters are not found
    with pytest.raises(ValueError, match=r"shapes \[\(23, 8\), \(23,\)\].*Projection\(module=\.\.\.\)$"):
        chunked_hybrid_loss_sums(unlisted, None, [], targets, LossSettings(alpha=0.0), chunk_size)
    listed = Projection(hidden, lambda rows: head(rows), module=head)
    chunked_hybrid_loss_sums(listed, None, [], targets, LossSettings(alpha=0.0), chunk_size).total.backward()
    assert head.weight.grad.abs().sum() > 0 and head.bias.grad.abs().sum() > 0


def test_a_second_backward_through_the_same_loss_is_refused_not_scaled_twice():
    """The stored gradients are scaled in place by the first backward: a second one must fail loudly."""
    torch.manual_seed(15)
    head = torch.nn.Linear(8, 23)
    hidden = torch.randn(9, 8, requires_grad=True)
    sums = chunked_hybrid_loss_sums(Projection(hidden, head), None, [], torch.randint(0, 23, (9,)),
                                    LossSettings(alpha=0.0), 4)
    sums.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        sums.total.backward()


def naive_hybrid_over_sequences(student, teacher, member, labels, alpha, temperature):
    """The hybrid loss of [B, L, V] logits, summed position by position over t whose next label is supervised."""
    total = 0.0
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            next_token = labels[row, t + 1].item()
            if next_token == -100:
                continue
            mixture = (student[row, t] + member[row, t]) / 2
            log_p_teacher = torch.log_softmax(teacher[row, t] / temperature, dim=-1)
            log_p_mixture_t = torch.log_softmax(mixture / temperature, dim=-1)
            kl = torch.sum(log_p_teacher.exp() * (log_p_teacher - log_p_mixture_t))
            total = total + alpha * temperature**2 * kl - (1 - alpha) * torch.log_softmax(mixture, -1)[next_token]
    return total


def test_positions_masked_in_the_middle_of_a_sequence_contribute_nothing():
    torch.manual_seed(8)
    vocab = 11
    # Row 0: prompt, assistant turn, user turn, assistant turn, padding. Row 1: prompt, one answer, padding.
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100, -100, -100, 6, 7, -100, -100],
                           [-100, -100, -100, 8, 9, 10, 2, -100, -100, -100, -100, -100]])
    shape = (*labels.shape, vocab)
    student, teacher, member = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    settings = LossSettings(alpha=0.4, temperature=2.0)

    def pipeline_loss(student_logits, teacher_logits, member_logits):
        student_logits = student_logits.clone().requires_grad_(True)
        mask = predictor_mask(labels)
        sums = hybrid_loss_sums(student_logits[mask], teacher_logits[mask], [member_logits[mask]],
                                next_token_targets(labels), settings)
        sums.total.backward()
        return sums.total, student_logits.grad

    loss, gradient = pipeline_loss(student, teacher, member)
    reference_student = student.clone().requires_grad_(True)
    expected = naive_hybrid_over_sequences(reference_student, teacher, member, labels, 0.4, 2.0)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(gradient, reference_student.grad, atol=1e-6, rtol=1e-5)

    # Large random logits at every position that predicts an unsupervised token (the start, the user turn in the
    # middle, the end) change neither the loss nor the student's gradient, which is 0 there.
    unsupervised = torch.ones_like(labels, dtype=torch.bool)
    unsupervised[:, :-1] = labels[:, 1:] == -100
    assert unsupervised[0, 4:7].all() and not unsupervised[0, 3] and not unsupervised[0, 7]  # the middle turn
    noisy = [torch.where(unsupervised.unsqueeze(-1), 100 * torch.randn(shape), logits)
             for logits in (student, teacher, member)]
    noisy_loss, noisy_gradient = pipeline_loss(*noisy)
    assert noisy_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(noisy_gradient, gradient, atol=0, rtol=0)
    assert (gradient[unsupervised] == 0).all() and gradient[~unsupervised].abs().sum() > 0


def test_probability_averaging_at_a_temperature_tempers_the_ensembles_own_prediction():
    """combine=probs, T = 2: the divergence compares softmax(teacher / T) with p_mix^(1/T) normalised, where p_mix
    is the mean of the members' probabilities at T = 1 (what the ensemble predicts); the NLL is on p_mix itself."""
    torch.manual_seed(9)
    student, teacher, member = torch.randn(4, 7), torch.randn(4, 7), torch.randn(4, 7)
    targets = torch.randint(0, 7, (4,))
    alpha, temperature = 0.7, 2.0
    sums = hybrid_loss_sums(student, teacher, [member], targets,
                            LossSettings(alpha=alpha, temperature=temperature, combine="probs"))
    p_mix = (softmax(student) + softmax(member)) / 2
    tempered = p_mix ** (1 / temperature)
    tempered = tempered / tempered.sum(dim=-1, keepdim=True)
    p_teacher = softmax(teacher, temperature)
    expected = sum(alpha * temperature**2 * reference_kl(p_teacher[i], tempered[i])
                   + (1 - alpha) * -math.log(p_mix[i, targets[i]].item()) for i in range(4))
    assert sums.total.item() == pytest.approx(expected, rel=1e-5)
    # It is not the mixture of the members' tempered distributions, which would give another value.
    mixed_tempered = (softmax(student, temperature) + softmax(member, temperature)) / 2
    other = sum(reference_kl(p_teacher[i], mixed_tempered[i]) for i in range(4))
    assert sums.divergence.item() != pytest.approx(other, rel=1e-3)
