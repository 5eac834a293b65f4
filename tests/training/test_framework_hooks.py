"""The private framework APIs of ldm/training/framework_hooks.py still behave as it assumes: these fail when
Lightning or torch changes under them."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.optim.lr_scheduler import LambdaLR

from ldm.training.framework_hooks import log_batch_row, set_last_lr, step_uncounted


class _TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers, the second stepped uncounted (as AutoencoderKL's discriminator)."""

    def __init__(self, uncounted: bool):
        super().__init__()
        self.automatic_optimization = False
        self.uncounted = uncounted
        self.a, self.b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        for opt, layer in ((opt_a, self.a), (opt_b, self.b)):
            opt.zero_grad()
            self.manual_backward(layer(batch[0]).pow(2).mean())
            if opt is opt_b and self.uncounted:
                step_uncounted(opt)
            else:
                opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)]


def _global_step_after(batches: int, uncounted: bool) -> tuple[int, torch.Tensor]:
    torch.manual_seed(0)
    model = _TwoOptimizers(uncounted)
    before = model.b.weight.detach().clone()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(batches, 2)), batch_size=1)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    return trainer.global_step, (model.b.weight.detach() - before).abs().sum()


def test_lightning_counts_every_manual_step_and_step_uncounted_takes_one_out():
    counted, _ = _global_step_after(3, uncounted=False)
    assert counted == 6  # why the hook exists: two optimizers, two steps per batch
    uncounted, moved = _global_step_after(3, uncounted=True)
    assert uncounted == 3 and moved > 0  # one step per batch, and the second optimizer still stepped


def test_set_last_lr_is_what_get_last_lr_reports():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LambdaLR(opt, lambda step: 0.5)
    assert sched.get_last_lr() == [0.5]
    opt.param_groups[0]["lr"] = 0.25
    set_last_lr(sched, [0.25])
    assert sched.get_last_lr() == [0.25]
    opt.step()
    sched.step()  # and torch's own step still writes the same attribute
    assert sched.get_last_lr() == [0.5]


def test_log_batch_row_calls_what_lightnings_loop_calls_after_a_batch():
    """The two private calls exist on this Lightning's trainer, and are what its training loop runs after
    ``on_train_batch_end`` (a Lightning that renames them fails here, not in a stopped run)."""
    import inspect

    from pytorch_lightning.loops import training_epoch_loop

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    calls = []
    for name in ("on_batch_end", "update_train_step_metrics"):
        setattr(trainer._logger_connector, name, lambda name=name: calls.append(name))
    log_batch_row(trainer)
    assert calls == ["on_batch_end", "update_train_step_metrics"]
    source = inspect.getsource(training_epoch_loop)
    assert "trainer._logger_connector.on_batch_end()" in source
    assert "trainer._logger_connector.update_train_step_metrics()" in source


def test_no_other_module_reads_a_private_attribute_of_another_object():
    """Private names are touched in ldm/training/framework_hooks.py only (``self._x`` / ``cls._x`` are the object's
    own)."""
    import ast

    from tests.conftest import REPO

    files = [*(REPO / "ldm").rglob("*.py"), REPO / "main.py", REPO / "inpaint_st.py", REPO / "txt2img.py"]
    found = []
    for path in files:
        if path.name == "framework_hooks.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} .{node.attr}")
    assert found == []
