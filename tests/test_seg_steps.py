"""The segmentation loss and train step against PyTorch's cross entropy (mmseg's reduction)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.segmentation import StandInSeg

from biformer_jax.tasks.segmentation import optim, steps
from biformer_jax.training.train_state import init_train_state


def torch_loss(logits, labels, avg_non_ignore):
    x = F.interpolate(torch.tensor(np.asarray(logits)).permute(0, 3, 1, 2), size=labels.shape[1:], mode="bilinear")
    nll = F.cross_entropy(x, torch.tensor(labels).long(), ignore_index=255, reduction="none")
    return float(nll.sum() / (labels != 255).sum()) if avg_non_ignore else float(nll.mean())


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_cross_entropy_is_mmsegs(avg_non_ignore):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 20, 24)).astype(np.int32)
    labels[:, :3] = 255
    ours = steps.seg_cross_entropy(
        jnp.asarray(logits), jnp.asarray(labels), ignore_index=255, avg_non_ignore=avg_non_ignore
    )
    assert float(ours) == pytest.approx(torch_loss(logits, labels, avg_non_ignore), rel=1e-5)


def test_train_step_adds_the_auxiliary_loss_and_updates():
    model = StandInSeg(num_classes=4, auxiliary_head=True)
    cfg = ml_collections.ConfigDict(dict(name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                         no_decay_keys=(), clip_grad_norm=0.0, schedule="poly", power=1.0, min_lr=0.0,
                                         warmup_iters=0, warmup_ratio=1.0))  # fmt: skip
    schedule = optim.lr_schedule(cfg, 10)
    tx = optim.create_optimizer(cfg, schedule)
    state = init_train_state(0, model=model, tx=tx, input_shape=(1, 16, 16, 3), use_ema=False)
    rng = np.random.default_rng(1)
    batch = {"image": rng.normal(size=(2, 16, 16, 3)).astype(np.float32), "label": rng.integers(0, 4, (2, 16, 16))}
    batch["label"][0, :4] = 255
    loss_cfg = {"ignore_index": 255, "avg_non_ignore": False, "aux_weight": 0.4}
    step = jax.jit(
        functools.partial(steps.seg_train_step, model=model, tx=tx, schedule=schedule, loss_cfg=loss_cfg, ema_decay=0.0)
    )
    new, metrics = step(state, batch)
    (logits, aux), _ = model.apply(
        state.variables, batch["image"], train=True, return_aux=True, mutable=["batch_stats"]
    )
    expected = torch_loss(logits, batch["label"], False) + 0.4 * torch_loss(aux, batch["label"], False)
    assert float(metrics.compute()["loss"]) == pytest.approx(expected, rel=1e-5)
    assert int(new.step) == 1 and not np.allclose(new.params["aux"]["kernel"], state.params["aux"]["kernel"])
