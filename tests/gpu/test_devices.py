"""The probe on each device: exact against the CPU float64 reference, bf16 teacher, bit-for-bit
restore, torchrun with one rank. The cuda cases are marked `gpu` and skipped without CUDA; the cpu
cases run everywhere, so the checks' code is exercised on every machine."""

import pytest

from checks import (check_bf16_teacher, check_exact_equals_float64_reference, check_theta0_restored,
                    check_torchrun_one_rank)
from conftest import requires_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair_name", ["pair", "llama_pair"])
@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "sampled_token"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "normalized"])
def test_exact_probe_equals_cpu_float64_reference(request, contexts, device, pair_name, loss, optimizer):
    check_exact_equals_float64_reference(device, request.getfixturevalue(pair_name), contexts, loss, optimizer)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair_name", ["pair", "llama_pair"])
def test_theta0_restored_bit_for_bit(request, contexts, device, pair_name):
    check_theta0_restored(device, request.getfixturevalue(pair_name), contexts)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_teacher(tmp_path, pair, contexts, device):
    check_bf16_teacher(device, tmp_path, pair, contexts)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_torchrun_one_rank_equals_plain_run(tmp_path, pair, contexts, device):
    check_torchrun_one_rank(device, tmp_path, pair, contexts)
