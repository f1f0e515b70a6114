"""The checks of test_cuda.py on CPU, so that their code runs (and passes) on machines without a GPU."""

import pytest

from checks import (check_bf16_teacher, check_exact_equals_float64_reference, check_theta0_restored,
                    check_torchrun_one_rank)


@pytest.mark.parametrize("pair_name", ["pair", "llama_pair"])
@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "sampled_token"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "normalized"])
def test_cpu_exact_probe_equals_float64_reference(request, contexts, pair_name, loss, optimizer):
    check_exact_equals_float64_reference("cpu", request.getfixturevalue(pair_name), contexts, loss, optimizer)


@pytest.mark.parametrize("pair_name", ["pair", "llama_pair"])
def test_cpu_theta0_restored_bit_for_bit(request, contexts, pair_name):
    check_theta0_restored("cpu", request.getfixturevalue(pair_name), contexts)


def test_cpu_bf16_teacher(tmp_path, pair, contexts):
    check_bf16_teacher("cpu", tmp_path, pair, contexts)


@pytest.mark.slow
def test_cpu_torchrun_one_rank_equals_plain_run(tmp_path, pair, contexts):
    check_torchrun_one_rank("cpu", tmp_path, pair, contexts)
