"""The teacher loader: an earlier run's classifier (from its config.yaml and Lightning checkpoint) or a library model,
frozen, and the errors that name the option at fault."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from losslab.errors import ConfigError
from losslab.losses.distillation import DualHead, KnowledgeDistillation, TeacherOutputs
from losslab.models.mlp import MLP
from losslab.teacher import Teacher, from_model, from_run

CLASSES, CHANNELS, SIZE = 3, 1, 6
BACKBONE = {"_target_": "losslab.models.mlp.MLP", "hidden_dims": [16, 8], "dropout": 0.0}


class Run(nn.Module):
    """The training module's layout: Lightning saves ``backbone.*``, ``head.*`` (and ``projector.*``)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.backbone = MLP(CHANNELS, SIZE, hidden_dims=[16, 8])
        self.head = head
        self.projector = nn.Linear(8, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def make_run(run_dir, head=None, loss=None, dataset="digits", checkpoint="last"):
    """A run directory with a config.yaml and a checkpoint of a briefly trained model (BatchNorm statistics moved)."""
    torch.manual_seed(0)
    model = Run(head if head is not None else nn.Linear(8, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        images, labels = torch.randn(16, CHANNELS, SIZE, SIZE), torch.randint(0, CLASSES, (16,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    (run_dir / "checkpoints").mkdir(parents=True)
    config = {
        "backbone": BACKBONE,
        "dataset": {"name": dataset},
        "loss": loss or {"_target_": "losslab.losses.CrossEntropy"},
    }
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": {"num_classes": CLASSES}, "epoch": 2},
        run_dir / "checkpoints" / f"{checkpoint}.ckpt",
    )
    return model.eval()


def load(run_dir, **kwargs):
    options = {
        "num_classes": CLASSES, "in_channels": CHANNELS, "image_size": SIZE, "checkpoint": "last", "dataset": "digits"
    }
    return from_run(str(run_dir), **{**options, **kwargs})


def test_from_run_reproduces_the_runs_logits_and_features(tmp_path):
    model = make_run(tmp_path / "run")
    teacher = load(tmp_path / "run")
    images = torch.randn(5, CHANNELS, SIZE, SIZE)
    outputs = teacher(images)
    assert isinstance(outputs, TeacherOutputs) and teacher.feature_dim == 8 and teacher.num_classes == CLASSES
    assert type(teacher.head) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(outputs.features, model.backbone(images))
        torch.testing.assert_close(outputs.logits, model(images))


def test_a_relative_run_dir_is_taken_from_root_dir(tmp_path):
    make_run(tmp_path / "outputs" / "run")
    assert load("outputs/run", root_dir=str(tmp_path)).num_classes == CLASSES


def test_a_head_the_runs_loss_owned_is_rebuilt_by_that_loss(tmp_path):
    model = make_run(tmp_path / "run", head=DualHead(8, CLASSES),
                     loss={"_target_": "losslab.losses.distillation.DualHeadKD"})  # fmt: skip
    teacher = load(tmp_path / "run")
    images = torch.randn(5, CHANNELS, SIZE, SIZE)
    assert isinstance(teacher.head, DualHead)
    with torch.no_grad():
        torch.testing.assert_close(teacher(images).logits, model.head.main(model.backbone(images)))


def test_teacher_stays_in_eval_mode_without_gradients(tmp_path):
    make_run(tmp_path / "run")
    teacher = load(tmp_path / "run")
    container = nn.ModuleDict({"teacher": teacher})
    container.train()
    assert not any(module.training for module in teacher.modules())
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    images = torch.randn(4, CHANNELS, SIZE, SIZE, requires_grad=True)
    outputs = teacher(images)
    assert not outputs.logits.requires_grad and not outputs.features.requires_grad
    # two passes give the same outputs: BatchNorm uses (and keeps) its running statistics
    torch.testing.assert_close(teacher(images).logits, outputs.logits)


def test_teacher_outputs_feed_a_distillation_loss(tmp_path):
    make_run(tmp_path / "run")
    teacher = load(tmp_path / "run")
    images, labels = torch.randn(4, CHANNELS, SIZE, SIZE), torch.tensor([0, 1, 2, 0])
    student = torch.randn(4, CLASSES, requires_grad=True)
    KnowledgeDistillation()(student, labels, teacher(images)).backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("missing,option", [("dir", "teacher.run_dir"), ("config", "teacher.run_dir"),
                                            ("checkpoint", "teacher.checkpoint")])  # fmt: skip
def test_a_missing_run_dir_config_or_checkpoint_is_named(tmp_path, missing, option):
    run_dir = tmp_path / "run"
    if missing != "dir":
        make_run(run_dir)
        (run_dir / ("config.yaml" if missing == "config" else "checkpoints/last.ckpt")).unlink()
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        load(run_dir)


def test_a_missing_best_checkpoint_suggests_last(tmp_path):
    make_run(tmp_path / "run", checkpoint="last")
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint=best: .*teacher\.checkpoint=last"):
        load(tmp_path / "run", checkpoint="best")
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint='middle'"):
        load(tmp_path / "run", checkpoint="middle")


def test_a_teacher_of_other_classes_is_refused_naming_the_run(tmp_path):
    make_run(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"teacher\.run_dir=.* classifies 3 classes, .* has 10"):
        load(tmp_path / "run", num_classes=10)
    with pytest.raises(ConfigError, match=r"teacher\.run_dir=.* trained on dataset digits, .* is mnist"):
        load(tmp_path / "run", dataset="mnist")


def test_a_teacher_for_other_images_is_refused_naming_the_run(tmp_path):
    make_run(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"teacher\.run_dir=.*backbone does not fit .*3x6x6"):
        load(tmp_path / "run", in_channels=3)


def test_class_means_average_the_teacher_features_per_class():
    teacher = Teacher(nn.Flatten(), nn.Linear(2, 2), feature_dim=2, num_classes=2, source="test")
    images = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0], [9.0, 9.0]]).view(4, 2, 1, 1)
    batches = [(images[:2], torch.tensor([0, 0])), (images[2:], torch.tensor([[0.2, 0.8], [0.9, 0.1]]))]
    means = teacher.class_means(batches, num_classes=2)
    torch.testing.assert_close(means, torch.tensor([[13 / 3, 11 / 3], [0.0, 5.0]]))
    with pytest.raises(ConfigError, match=r"classes \[2\] have none"):
        teacher.class_means(batches, num_classes=3)


@pytest.mark.parametrize("library", ["torchvision", "timm"])
@pytest.mark.parametrize("channels", [1, 3])
def test_from_model_gives_logits_and_penultimate_features(library, channels):
    teacher = from_model("resnet18", num_classes=7, in_channels=channels, image_size=32, library=library)
    images = torch.randn(2, channels, 32, 32)
    outputs = teacher(images)
    assert (
        outputs.logits.shape == (2, 7) and outputs.features.shape == (2, 512) and teacher.feature_dim == 512
    )
    torch.testing.assert_close(outputs.logits, teacher.head(outputs.features))
    assert not any(module.training for module in teacher.modules())


@pytest.mark.parametrize(
    "kwargs,option",
    [
        ({"name": "resnet18", "library": "keras"}, "teacher.library"),
        ({"name": "not_a_model"}, "teacher.name"),
        ({"name": "not_a_model", "library": "timm"}, "teacher.name"),
    ],
)
def test_from_model_names_the_option_at_fault(kwargs, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        from_model(num_classes=7, in_channels=3, image_size=32, **kwargs)


def test_a_smoke_test_teacher_without_checkpoint_keeps_its_initial_weights(tmp_path):
    """A debug=fdr teacher run saves no checkpoint: its architecture is rebuilt with initial weights (a debug=fdr
    distillation chain then runs end to end); a real run without the checkpoint is still refused."""
    make_run(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "last.ckpt").unlink()
    config = OmegaConf.load(tmp_path / "run" / "config.yaml")
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint=last"):
        load(tmp_path / "run")
    config.trainer = {"fast_dev_run": True}
    OmegaConf.save(config, tmp_path / "run" / "config.yaml")
    teacher = load(tmp_path / "run")
    assert "fast_dev_run" in teacher.source
    assert teacher(torch.randn(2, CHANNELS, SIZE, SIZE)).logits.shape == (2, CLASSES)
