"""The probe on CUDA: exact against the CPU float64 reference, bf16 teacher, bit-for-bit restore,
torchrun with one GPU rank. Skipped as a whole without CUDA; test_cpu_twin.py runs the same checks
on CPU everywhere."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA (torch.cuda.is_available() is False)", allow_module_level=True)

from checks import (check_bf16_teacher, check_exact_equals_float64_reference, check_theta0_restored,  # noqa: E402
                    check_torchrun_one_rank)
from conftest import requires_cuda  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.mark.parametrize("pair_name", ["pair", "llama_pair"])
@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "sampled_token"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "normalized"])
def test_cuda_exact_probe_equals_cpu_float64_reference(request, contexts, pair_name, loss, optimizer):
    check_exact_equals_float64_reference("cuda", request.getfixturevalue(pair_name), contexts, loss, optimizer)


@pytest.mark.parametrize("pair_name", ["pair", "llama_pair"])
def test_cuda_theta0_restored_bit_for_bit(request, contexts, pair_name):
    check_theta0_restored("cuda", request.getfixturevalue(pair_name), contexts)


def test_cuda_bf16_teacher(tmp_path, pair, contexts):
    check_bf16_teacher("cuda", tmp_path, pair, contexts)


@pytest.mark.slow
def test_cuda_torchrun_one_rank_equals_plain_run(tmp_path, pair, contexts):
    check_torchrun_one_rank("cuda", tmp_path, pair, contexts)
