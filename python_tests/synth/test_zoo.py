"""Out of the box: DeepInversion's and ModelInversion's defaults invert every teacher of the zoo.

Each teacher of :data:`exml_fast.experiments.zoo.ZOO` — LeNet-5-BN, a slim ResNet-18 and MobileNetV2 (BatchNorm),
a BN-free LeNet-5, a GroupNorm CNN — is trained once for a fraction of an epoch on MNIST or Fashion-MNIST; then
20 images (two per class, one batch) are synthesised with every default but the step budget the zoo gives the
teacher, and the teacher must label at least 95 % (DeepInversion) / 90 % (ModelInversion) of them as their
target. ``benches/zoo_agreement.py`` records the same runs (and the old defaults beside them) in
``benches/results/zoo_agreement_cpu.md``. On the 2-core CPU a teacher takes 1-80 s to train (MobileNetV2 the most), a
synthesis 0.5-55 s; the whole file about 2.5 minutes.
"""

from __future__ import annotations

import pytest

from exml_fast import data
from exml_fast.experiments.zoo import ZOO, agreement, normalisation, train_zoo_teacher
from exml_fast.synth import DeepInversion, ModelInversion

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(data.find_data_root("mnist") is None or data.find_data_root("fashion-mnist") is None,
                       reason="MNIST / Fashion-MNIST files not found (set EXML_FAST_DATA)"),
]

N_IMAGES = 20
# A sanity floor for the briefly trained teachers (chance is 10 %); the figures are in the record.
MIN_TEACHER_ACCURACY = 0.7


@pytest.fixture(scope="module", params=list(ZOO))
def zoo_teacher(request):
    name = request.param
    teacher, acc, _ = train_zoo_teacher(name, seed=0)
    assert acc >= MIN_TEACHER_ACCURACY, f"{name} reached only {acc:.3f} on the test images"
    return name, teacher


def _synthesize(cls, name, teacher, iterations):
    mean, std = normalisation(name)
    synth = cls(teacher, input_shape=(1, 32, 32), mean=mean, std=std)
    batch = synth.synthesize(N_IMAGES, iterations=iterations, batch_size=N_IMAGES, generator=0, progress=False)
    return synth, agreement(teacher, batch)


def test_deepinversion_defaults_reach_the_targets(zoo_teacher):
    name, teacher = zoo_teacher
    synth, agree = _synthesize(DeepInversion, name, teacher, ZOO[name].di_iterations)
    assert synth.preset_name == "auto" and not synth.flip
    assert agree >= 0.95, f"{name}: DeepInversion's defaults reached {agree:.2f} (bn_weight {synth.bn_weight:.3g})"


def test_model_inversion_defaults_reach_the_targets(zoo_teacher):
    name, teacher = zoo_teacher
    synth, agree = _synthesize(ModelInversion, name, teacher, ZOO[name].mi_iterations)
    assert agree >= 0.90, f"{name}: ModelInversion's defaults reached {agree:.2f} (bn_weight {synth.bn_weight:.3g})"
