"""AuxiliaryData: samples of an unrelated dataset, labelled by the teacher."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from exml_fast.synth.base import Synthesizer, batch_seed, eval_mode
from exml_fast.synth.batch import SyntheticBatch

__all__ = ["AuxiliaryData"]


class AuxiliaryData(Synthesizer):
    """Auxiliary data (the Ex-Model CL paper's third generator): no optimisation.

    Draws inputs from a dataset the user has (Fashion-MNIST for an MNIST
    teacher, ImageNet for a CIFAR one) without replacement and labels each by
    the teacher: ``y = argmax`` of its logits over ``classes`` (all outputs by
    default), ``soft_targets`` its softmax over all outputs. Labels are the
    teacher's, so the class balance is whatever the teacher makes of the data.

    Args:
        teacher: any classifier ``nn.Module`` mapping (N, C, H, W) to (N, K) logits.
        data: an (N, C, H, W) float tensor, or a ``torch.utils.data.Dataset``
            whose items are an input tensor or a tuple starting with one.
            Inputs must already be in the teacher's input space (use
            ``transform`` otherwise).
        mean, std: the normalisation of the inputs (kept on the batch for
            :func:`exml_fast.viz.save_grid`); None: unknown.
        transform: applied to each drawn (B, C, H, W) batch before the teacher
            sees it and before it is returned.
        num_classes, device, batch_size: as for the other synthesizers.
    """

    method = "auxiliary"
    optimizes = False

    def __init__(
        self,
        teacher: nn.Module,
        data,
        *,
        mean=None,
        std=None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        batch_size: int = 256,
    ) -> None:
        owner = type(self).__name__
        if isinstance(data, torch.Tensor):
            if data.dim() != 4 or not data.is_floating_point():
                raise ValueError(f"{owner}: a data tensor must be (N, C, H, W) floating point; "
                                 f"got {tuple(data.shape)} {data.dtype}")
        elif not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            raise TypeError(f"{owner}: data must be an (N, C, H, W) tensor or a map-style Dataset; "
                            f"got {type(data).__name__}")
        if len(data) == 0:
            raise ValueError(f"{owner}: data is empty")
        if transform is not None and not callable(transform):
            raise TypeError(f"{owner}: transform must be callable or None")
        self.data = data
        self.transform = transform
        sample = self._fetch(torch.tensor([0]))
        super().__init__(teacher, input_shape=tuple(sample.shape[1:]), mean=mean, std=std,
                         num_classes=num_classes, device=device, iterations=None, batch_size=batch_size)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["data_len"] = len(self.data)
        return cfg

    def _fetch(self, idx: torch.Tensor) -> torch.Tensor:
        owner = type(self).__name__
        if isinstance(self.data, torch.Tensor):
            x = self.data[idx]
        else:
            items = []
            for i in idx.tolist():
                item = self.data[i]
                if isinstance(item, (tuple, list)):
                    item = item[0]
                if not isinstance(item, torch.Tensor):
                    raise TypeError(f"{owner}: dataset items must be tensors or tuples starting with one; "
                                    f"item {i} is {type(item).__name__}")
                items.append(item)
            x = torch.stack(items)
        if self.transform is not None:
            x = self.transform(x)
        if x.dim() != 4:
            raise ValueError(f"{owner}: inputs must be (C, H, W) images; got a batch of shape {tuple(x.shape)}")
        return x.float()

    def synthesize_iter(self, n, *, classes=None, iterations=None, batch_size=None, generator=None,
                        progress=True, save_to=None, distributed=None):
        if isinstance(n, int) and not isinstance(n, bool) and n > len(self.data):
            raise ValueError(f"{type(self).__name__}.synthesize: n ({n}) is larger than the dataset "
                             f"({len(self.data)} items); samples are drawn without replacement")
        self._classes = classes
        return super().synthesize_iter(n, classes=classes, iterations=iterations, batch_size=batch_size,
                                       generator=generator, progress=progress, save_to=save_to,
                                       distributed=distributed)

    synthesize_iter.__doc__ = Synthesizer.synthesize_iter.__doc__

    def _run(self, labels, bounds, iterations, seed, store, progress):
        # One permutation of the dataset for the whole job, from the job's seed alone,
        # so batch b draws the same items whether or not the job was resumed.
        self._perm = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(
            batch_seed(seed, -1)))
        return super()._run(labels, bounds, iterations, seed, store, progress)

    def _synthesize_batch(self, labels, *, iterations, generator, offset, progress) -> SyntheticBatch:
        b = labels.shape[0]
        idx = self._perm[offset : offset + b]
        x = self._fetch(idx).to(self.device)
        with eval_mode(self.teacher), torch.no_grad():
            logits = self.teacher(x).float()
        if logits.dim() != 2 or logits.shape[0] != b:
            raise ValueError(f"{type(self).__name__}: the teacher must return (N, K) logits; got {tuple(logits.shape)}")
        probs = torch.softmax(logits, 1)
        if self._classes is None:
            y = logits.argmax(1)
        else:
            cls = torch.as_tensor(list(self._classes), dtype=torch.int64, device=logits.device)
            y = cls[logits[:, cls].argmax(1)]
        confidence = probs.gather(1, y[:, None]).mean()
        progress(1, {"confidence": float(confidence)})
        return SyntheticBatch(x, y, probs, {"confidence": confidence.reshape(1).cpu()}, self.mean, self.std)

