"""AnyLoss and the Jaccard metric / Dice semimetric losses against float64 loop computations of their
papers' formulas (sample by sample, class by class), hand-computed cases, their identities and edge cases."""

import math

import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, fbeta_score, recall_score

from losslab.errors import ConfigError
from losslab.losses.metric_losses import AnyLoss, DiceSemimetricLoss, JaccardMetricLoss
from reference import finite_difference_gradient


def loop_softmax(row):
    top = max(row)
    exps = [math.exp(z - top) for z in row]
    return [e / sum(exps) for e in exps]


def amplify(p, L):
    return 1.0 / (1.0 + math.exp(-L * (p - 0.5)))


def loop_confusion(logits, labels, c, L):
    """One-vs-rest TP, FN, FP, TN of class c, accumulated sample by sample."""
    tp = fn = fp = tn = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        a = amplify(loop_softmax(row)[c], L)
        y = 1.0 if label == c else 0.0
        tp += y * a
        fn += y * (1 - a)
        fp += (1 - y) * a
        tn += (1 - y) * (1 - a)
    return tp, fn, fp, tn


def loop_anyloss(metric, L=73.0, beta=1.0):
    """Two classes: the paper's binary formulas on class 1's confusion matrix (recalls of absent classes
    left out). More classes: sum_c TP_c / N, macro F-beta, mean and geometric mean of the present recalls."""

    def reference(logits, labels):
        n, classes = logits.shape
        b2 = beta**2
        if classes == 2:
            tp, fn, fp, tn = loop_confusion(logits, labels, 1, L)
            if metric == "accuracy":
                return 1 - (tp + tn) / n
            if metric in ("f1", "fbeta"):
                return 1 - (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp)
            recalls = [tp / (tp + fn)] if tp + fn > 0 else []
            recalls += [tn / (tn + fp)] if tn + fp > 0 else []
        else:
            matrices = [loop_confusion(logits, labels, c, L) for c in range(classes) if c in labels.tolist()]
            if metric == "accuracy":
                return 1 - sum(loop_confusion(logits, labels, c, L)[0] for c in range(classes)) / n
            if metric in ("f1", "fbeta"):
                scores = [(1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp) for tp, fn, fp, _ in matrices]
                return 1 - sum(scores) / len(scores)
            recalls = [tp / (tp + fn) for tp, fn, _, _ in matrices]
        if metric == "balanced_accuracy":
            return 1 - sum(recalls) / len(recalls)
        return 1 - math.prod(recalls) ** (1 / len(recalls))

    return reference


def loop_overlap(kind, classes="present", threshold=0.01):
    """Per class over the batch: ||x||_1, ||y||_1 and ||x - y||_1 summed sample by sample, then the Dice or
    Jaccard score, averaged over the classes whose target exceeds the threshold somewhere (or over all)."""

    def reference(logits, target):
        n, num_classes = logits.shape
        probabilities = [loop_softmax(row) for row in logits.tolist()]
        if target.is_floating_point():
            targets = target.tolist()
        else:
            targets = [[1.0 if c == label else 0.0 for c in range(num_classes)] for label in target.tolist()]
        losses = []
        for c in range(num_classes):
            if classes == "present" and max(targets[i][c] for i in range(n)) <= threshold:
                continue
            x = sum(probabilities[i][c] for i in range(n))
            y = sum(targets[i][c] for i in range(n))
            difference = sum(abs(probabilities[i][c] - targets[i][c]) for i in range(n))
            if x + y == 0:
                losses.append(0.0)
            elif kind == "dice":
                losses.append(1 - (x + y - difference) / (x + y))
            else:
                losses.append(1 - (x + y - difference) / (x + y + difference))
        return sum(losses) / len(losses) if losses else 0.0

    return reference


ANYLOSS_CASES = {
    "anyloss_accuracy": (AnyLoss("accuracy"), loop_anyloss("accuracy")),
    "anyloss_f1": (AnyLoss("f1"), loop_anyloss("f1")),
    "anyloss_fbeta2": (AnyLoss("fbeta", beta=2.0), loop_anyloss("fbeta", beta=2.0)),
    "anyloss_geometric_mean": (AnyLoss("geometric_mean"), loop_anyloss("geometric_mean")),
    "anyloss_balanced_accuracy": (AnyLoss("balanced_accuracy"), loop_anyloss("balanced_accuracy")),
    "anyloss_f1_L5": (AnyLoss("f1", L=5.0), loop_anyloss("f1", L=5.0)),
    "anyloss_balanced_accuracy_L5": (
        AnyLoss("balanced_accuracy", L=5.0),
        loop_anyloss("balanced_accuracy", L=5.0),
    ),
}
OVERLAP_CASES = {
    "jaccard": (JaccardMetricLoss(), loop_overlap("jaccard")),
    "jaccard_all": (JaccardMetricLoss(classes="all"), loop_overlap("jaccard", "all")),
    "dice": (DiceSemimetricLoss(), loop_overlap("dice")),
    "dice_all": (DiceSemimetricLoss(classes="all"), loop_overlap("dice", "all")),
    "dice_threshold_0": (DiceSemimetricLoss(threshold=0.0), loop_overlap("dice", threshold=0.0)),
}
CASES = {**ANYLOSS_CASES, **OVERLAP_CASES}


def make_batch(name):
    """Hard-label batches in float64; every one is used for value, gradient and gradcheck."""
    generator = torch.Generator().manual_seed(0)
    if name in ("binary", "binary_no_positives", "binary_only_positives"):
        logits = torch.randn(8, 2, generator=generator, dtype=torch.float64)
        labels = {
            "binary": torch.tensor([0, 1, 1, 0, 0, 1, 0, 0]),
            "binary_no_positives": torch.zeros(8, dtype=torch.long),
            "binary_only_positives": torch.ones(8, dtype=torch.long),
        }[name]
        return logits, labels
    logits = torch.randn(7, 5, generator=generator, dtype=torch.float64) * 1.5
    labels = {
        "multiclass": torch.tensor([0, 3, 1, 4, 2, 3, 0]),
        "absent_classes": torch.tensor([0, 1, 1, 0, 1, 0, 0]),  # classes 2, 3 and 4 never occur
        "single_class": torch.full((7,), 2),
        "all_equal_logits": torch.tensor([0, 3, 1, 4, 2, 3, 0]),
    }[name]
    if name == "all_equal_logits":
        logits = torch.zeros_like(logits)
    return logits, labels


BATCHES = [
    "multiclass",
    "binary",
    "absent_classes",
    "single_class",
    "binary_no_positives",
    "binary_only_positives",
    "all_equal_logits",
]


@pytest.mark.parametrize("batch_name", BATCHES)
@pytest.mark.parametrize("name", CASES)
def test_value_matches_loop_reference(name, batch_name):
    loss, reference = CASES[name]
    logits, labels = make_batch(batch_name)
    assert loss(logits, labels).item() == pytest.approx(reference(logits, labels), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("batch_name", BATCHES)
@pytest.mark.parametrize("name", CASES)
def test_gradient_matches_finite_differences_of_loop_reference(name, batch_name):
    loss, reference = CASES[name]
    logits, labels = make_batch(batch_name)
    logits = logits.clone().requires_grad_()
    loss(logits, labels).backward()
    expected = finite_difference_gradient(lambda z: reference(z, labels), logits.detach())
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batch_name", BATCHES)
@pytest.mark.parametrize("name", CASES)
def test_gradcheck_in_float64(name, batch_name):
    loss, _ = CASES[name]
    logits, labels = make_batch(batch_name)
    assert torch.autograd.gradcheck(lambda z: loss(z, labels), (logits.clone().requires_grad_(),))


@pytest.mark.parametrize("name", CASES)
def test_logits_of_magnitude_1e4_give_finite_value_and_gradient(name):
    loss, _ = CASES[name]
    labels = torch.tensor([0, 1, 2, 3])
    logits = torch.full((4, 5), -1e4)
    logits[0, 0] = logits[1, 1] = 1e4  # confidently right
    logits[2, 4] = logits[3, 0] = 1e4  # confidently wrong
    logits.requires_grad_()
    value = loss(logits, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_half_precision_inputs_are_computed_in_float32(name, dtype):
    loss, _ = CASES[name]
    logits, labels = make_batch("multiclass")
    half = (logits * 10).to(dtype).requires_grad_()  # large logits overflow exp() in half precision
    value = loss(half, labels)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(half.grad).all()
    assert value.item() == pytest.approx(loss(half.detach().double(), labels).item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", OVERLAP_CASES)
def test_half_precision_soft_targets_are_accepted(name, dtype):
    loss, _ = CASES[name]
    logits, target = soft_batch()
    value = loss(logits.to(dtype), target.to(dtype))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(loss(logits, target).item(), rel=1e-2, abs=1e-3)


# --- AnyLoss ---------------------------------------------------------------------------------------------


def hard_logits(predictions, classes):
    """float64 logits whose softmax is exactly one-hot (exp(-1e4) is 0), i.e. already-binary probabilities."""
    return torch.nn.functional.one_hot(predictions, classes).double() * 1e4


ANYLOSS_ON_HARD_PREDICTIONS = [
    # (labels, predictions, classes): every present class has a hit, so the geometric mean is not 0.
    ([0, 1, 1, 0, 0, 1, 0, 0, 1, 0], [0, 1, 0, 0, 1, 1, 0, 1, 1, 0], 2),
    ([0, 3, 1, 4, 2, 3, 0, 4, 1, 2], [0, 3, 1, 1, 2, 0, 0, 4, 1, 2], 5),
    ([0, 1, 1, 0, 1, 0, 0, 1], [0, 1, 3, 0, 1, 2, 1, 1], 4),  # classes 2 and 3 predicted but absent
]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize(("labels", "predictions", "classes"), ANYLOSS_ON_HARD_PREDICTIONS)
def test_anyloss_on_already_binary_probabilities_is_one_minus_the_metric(labels, predictions, classes):
    labels, predictions = torch.tensor(labels), torch.tensor(predictions)
    logits = hard_logits(predictions, classes)
    present = sorted(set(labels.tolist()))
    average = "binary" if classes == 2 else "macro"
    f_labels = None if classes == 2 else present
    recalls = recall_score(labels, predictions, labels=present, average=None)
    expected = {
        "accuracy": accuracy_score(labels, predictions),
        "f1": f1_score(labels, predictions, average=average, labels=f_labels),
        "fbeta": fbeta_score(labels, predictions, beta=2.0, average=average, labels=f_labels),
        "balanced_accuracy": balanced_accuracy_score(labels, predictions),
        "geometric_mean": math.prod(recalls) ** (1 / len(recalls)),
    }
    for metric, value in expected.items():
        loss = AnyLoss(metric, beta=2.0 if metric == "fbeta" else 1.0)
        assert loss(logits, labels).item() == pytest.approx(1 - value, abs=1e-12), metric


def test_anyloss_at_probability_one_half_matches_hand_computation():
    # Equal logits, two classes: p = 0.5 and A(0.5) = 0.5 for every sample. One positive, three negatives:
    # TP = FN = 0.5, FP = TN = 1.5. accuracy (0.5 + 1.5) / 4 = 1/2; F1 = 1 / (1 + 0.5 + 1.5) = 1/3;
    # F2 = 5 * 0.5 / (5 * 0.5 + 4 * 0.5 + 1.5) = 5/12; both recalls 1/2, so balanced accuracy and G-mean 1/2.
    logits = torch.zeros(4, 2, dtype=torch.float64)
    labels = torch.tensor([1, 0, 0, 0])
    expected_loss = {
        "accuracy": 1 / 2,
        "f1": 2 / 3,
        "fbeta": 7 / 12,
        "balanced_accuracy": 1 / 2,
        "geometric_mean": 1 / 2,
    }
    for metric, value in expected_loss.items():
        loss = AnyLoss(metric, beta=2.0 if metric == "fbeta" else 1.0)
        assert loss(logits, labels).item() == pytest.approx(value, rel=1e-14), metric


def test_anyloss_with_two_classes_is_the_papers_binary_loss_on_sigmoid_outputs():
    """The paper's F-beta on y_hat = A(sigmoid(z_1 - z_0)): (1 + b^2) TP / (b^2 sum y + sum y_hat)."""
    logits, labels = make_batch("binary")
    y = labels.double()
    y_hat = torch.sigmoid(73.0 * (torch.sigmoid(logits[:, 1] - logits[:, 0]) - 0.5))
    for beta in (1.0, 0.5, 2.0):
        paper = 1 - (1 + beta**2) * (y * y_hat).sum() / (beta**2 * y.sum() + y_hat.sum())
        assert AnyLoss("fbeta", beta=beta)(logits, labels).item() == pytest.approx(paper.item(), rel=1e-12)


def test_anyloss_amplification_sharpens_toward_the_thresholded_metric():
    """Larger L brings A(p) closer to 1[p > 0.5]: the accuracy loss tends to 1 - mean_i 1[p_iy > 0.5]."""
    logits, labels = make_batch("multiclass")
    thresholded = 1 - (logits.softmax(1).gather(1, labels[:, None]).squeeze(1) > 0.5).double().mean().item()
    gaps = [abs(AnyLoss("accuracy", L=L)(logits, labels).item() - thresholded) for L in (5.0, 73.0, 1000.0)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3


@pytest.mark.parametrize("metric", ["accuracy", "f1", "geometric_mean", "balanced_accuracy"])
def test_anyloss_with_a_huge_L_stays_finite_where_A_underflows_to_zero(metric):
    # L = 1e4: A(p) is exactly 0 or 1 in float32, so a class can have TP = 0 and TP + FP = 0.
    for labels in (torch.tensor([0, 0, 0]), torch.tensor([0, 1, 1])):
        logits = torch.tensor([[5.0, -5.0], [4.0, -4.0], [-6.0, 6.0]], requires_grad=True)
        value = AnyLoss(metric, L=1e4)(logits, labels)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


# --- Jaccard metric loss and Dice semimetric loss -----------------------------------------------------------


def soft_batch():
    """Random probability targets; class 4 never reaches 0.01, so it is absent for classes="present"."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 5, generator=generator, dtype=torch.float64) * 2
    target_logits = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    target_logits[:, 4] = -8.0
    return logits, target_logits.softmax(1)


@pytest.mark.parametrize("name", OVERLAP_CASES)
def test_soft_targets_match_loop_reference_value_and_gradient(name):
    loss, reference = OVERLAP_CASES[name]
    logits, target = soft_batch()
    logits = logits.clone().requires_grad_()
    value = loss(logits, target)
    value.backward()
    assert value.item() == pytest.approx(reference(logits.detach(), target), rel=1e-10)
    expected = finite_difference_gradient(lambda z: reference(z, target), logits.detach())
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)
    assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits.detach().clone().requires_grad_(),))


def test_present_classes_leave_out_a_class_below_the_threshold_and_all_keeps_it():
    logits, target = soft_batch()
    present = JaccardMetricLoss()(logits, target).item()
    every = JaccardMetricLoss(classes="all")(logits, target).item()
    assert present != pytest.approx(every)
    assert JaccardMetricLoss(threshold=0.0)(logits, target).item() == pytest.approx(every, rel=1e-14)


@pytest.mark.parametrize("loss_class", [JaccardMetricLoss, DiceSemimetricLoss])
def test_one_hot_probability_targets_equal_class_index_targets(loss_class):
    logits, labels = make_batch("absent_classes")
    one_hot = torch.nn.functional.one_hot(labels, 5).double()
    for classes in ("present", "all"):
        loss = loss_class(classes=classes)
        assert loss(logits, one_hot).item() == pytest.approx(loss(logits, labels).item(), rel=1e-14)


def test_hand_computed_two_class_case():
    # softmax rows (0.75, 0.25) and (0.5, 0.5); labels 0 and 1.
    # class 0: x = (0.75, 0.5), y = (1, 0): ||x|| = 1.25, ||y|| = 1, ||x - y|| = 0.25 + 0.5 = 0.75
    #   Dice (2.25 - 0.75) / 2.25 = 2/3, Jaccard 1.5 / 3 = 1/2
    # class 1: x = (0.25, 0.5), y = (0, 1): ||x|| = 0.75, ||y|| = 1, ||x - y|| = 0.75
    #   Dice (1.75 - 0.75) / 1.75 = 4/7, Jaccard 1 / 2.5 = 2/5
    # Dice loss 1 - (2/3 + 4/7) / 2 = 8/21; Jaccard loss 1 - (1/2 + 2/5) / 2 = 11/20.
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    assert DiceSemimetricLoss()(logits, labels).item() == pytest.approx(8 / 21, rel=1e-14)
    assert JaccardMetricLoss()(logits, labels).item() == pytest.approx(11 / 20, rel=1e-14)


@pytest.mark.parametrize("loss_class", [JaccardMetricLoss, DiceSemimetricLoss])
def test_hard_labels_give_the_soft_jaccard_and_soft_dice(loss_class):
    """With one-hot y, ||x|| + ||y|| - ||x - y|| = 2 <x, y>: the classical soft scores."""
    logits, labels = make_batch("multiclass")
    x, y = logits.softmax(1), torch.nn.functional.one_hot(labels, 5).double()
    intersection, total = (x * y).sum(0), (x + y).sum(0)
    if loss_class is DiceSemimetricLoss:
        score = 2 * intersection / total
    else:
        score = intersection / (total - intersection)
    expected = 1 - score.mean().item()
    assert loss_class(classes="all")(logits, labels).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss_class", [JaccardMetricLoss, DiceSemimetricLoss])
def test_perfect_prediction_gives_zero_for_hard_and_soft_targets(loss_class):
    labels = torch.tensor([0, 3, 1, 4, 2, 3, 0])
    confident = torch.nn.functional.one_hot(labels, 5).double() * 50
    assert loss_class()(confident, labels).item() == pytest.approx(0.0, abs=1e-12)
    _, target = soft_batch()
    for classes in ("present", "all"):
        assert loss_class(classes=classes)(target.log(), target).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("loss_class", [JaccardMetricLoss, DiceSemimetricLoss])
def test_soft_target_is_the_minimiser_not_the_confident_prediction(loss_class):
    """The point of the metric losses: the soft Jaccard/Dice would prefer sharpening towards the argmax."""
    _, target = soft_batch()
    at_target = loss_class(classes="all")(target.log(), target).item()
    sharpened = loss_class(classes="all")(target.log() * 3, target).item()
    assert at_target < 1e-12 < sharpened


def test_jaccard_score_is_dice_over_two_minus_dice_on_a_single_class_batch():
    logits, labels = make_batch("single_class")
    dice = 1 - DiceSemimetricLoss()(logits, labels).item()
    jaccard = 1 - JaccardMetricLoss()(logits, labels).item()
    assert jaccard == pytest.approx(dice / (2 - dice), rel=1e-12)
    _, target = soft_batch()
    one_class = torch.zeros_like(target)
    one_class[:, 1] = target[:, 1]  # the other classes stay below the threshold
    dice = 1 - DiceSemimetricLoss()(logits, one_class).item()
    jaccard = 1 - JaccardMetricLoss()(logits, one_class).item()
    assert jaccard == pytest.approx(dice / (2 - dice), rel=1e-12)


@pytest.mark.parametrize("loss_class", [JaccardMetricLoss, DiceSemimetricLoss])
def test_all_classes_count_an_absent_class_as_loss_one(loss_class):
    """An absent class has ||y|| = 0 and ||x - y|| = ||x||: its score is 0 whatever the prediction."""
    logits, labels = make_batch("absent_classes")  # 2 of 5 classes present
    present = loss_class()(logits, labels).item()
    assert loss_class(classes="all")(logits, labels).item() == pytest.approx((2 * present + 3) / 5, rel=1e-12)


@pytest.mark.parametrize("loss_class", [JaccardMetricLoss, DiceSemimetricLoss])
def test_no_class_above_the_threshold_gives_zero_with_a_finite_gradient(loss_class):
    logits = torch.randn(4, 200, dtype=torch.float64, requires_grad=True)
    uniform = torch.full((4, 200), 1 / 200, dtype=torch.float64)  # 0.005 < 0.01 everywhere
    value = loss_class()(logits, uniform)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("loss_class", [JaccardMetricLoss, DiceSemimetricLoss])
def test_class_with_underflowed_prediction_and_no_target_scores_as_two_empty_sets(loss_class):
    labels = torch.tensor([0, 1, 0, 1])
    logits = torch.zeros(4, 3)
    logits[:, 2] = -1e4  # softmax is exactly 0 for class 2, which no sample has
    logits.requires_grad_()
    value = loss_class(classes="all")(logits, labels)
    value.backward()
    expected = loss_class()(logits.detach(), labels).item() * 2 / 3  # class 2 scores 1, loss 0
    assert value.item() == pytest.approx(expected, rel=1e-6) and torch.isfinite(logits.grad).all()


# --- declarations and configuration ------------------------------------------------------------------------


def test_declared_inputs():
    assert all(cls.kind == "classification" for cls in (AnyLoss, JaccardMetricLoss, DiceSemimetricLoss))
    assert JaccardMetricLoss.accepts_soft_targets and DiceSemimetricLoss.accepts_soft_targets
    assert not AnyLoss.accepts_soft_targets


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AnyLoss(metric="precision"), r"loss\.metric='precision'.*accuracy, f1, fbeta"),
        (lambda: AnyLoss(metric="F1"), r"loss\.metric"),
        (lambda: AnyLoss(L=0.0), r"loss\.L"),
        (lambda: AnyLoss(L=-73.0), r"loss\.L"),
        (lambda: AnyLoss(metric="fbeta", beta=0.0), r"loss\.beta"),
        (lambda: AnyLoss(metric="f1", beta=2.0), r"loss\.beta.*loss\.metric=fbeta"),
        (lambda: JaccardMetricLoss(classes="label"), r"loss\.classes='label'.*present, all"),
        (lambda: DiceSemimetricLoss(classes="PRESENT"), r"loss\.classes"),
        (lambda: DiceSemimetricLoss(threshold=1.0), r"loss\.threshold"),
        (lambda: JaccardMetricLoss(threshold=-0.1), r"loss\.threshold"),
    ],
)
def test_bad_hyperparameters_raise_config_error_naming_the_option(make, message):
    with pytest.raises(ConfigError, match=message):
        make()
