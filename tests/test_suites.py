"""Suite files: every shipped suite loads, and bad files are rejected with file, key and form."""

import pytest
import torch

from cebench import suites


@pytest.mark.parametrize("name", suites.available_suites())
def test_shipped_suites_load(name):
    suite = suites.load(name)
    assert list(suite.cells()), f"{name} has no cases"


def test_required_suites_exist():
    assert {"smoke", "gpt2", "llama3", "gemma2", "vocab-sweep", "tokens-sweep"} <= set(suites.available_suites())


def test_gpt2_and_gemma_shapes():
    gpt2 = [c for c, _, _ in suites.load("gpt2").cells()]
    assert all(c.V == 50257 and c.N % 1024 == 0 for c in gpt2)
    assert {c.H for c in gpt2 if c.family == "linear"} == {768}
    gemma = [c for c, _, _ in suites.load("gemma2").cells() if c.family == "linear"]
    assert [(c.N, c.V, c.H, c.dtype) for c in gemma] == [(8192, 256000, 2304, "bfloat16")]


def _write(tmp_path, body):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    return path


@pytest.mark.parametrize("body,expected", [
    ('name = "x"\n[[sweep]]\nfamily = "logits"\nN = [4]\nV = [8]\nvocab = [3]\n', "unknown key 'sweep[0].vocab'"),
    ('name = "x"\n[[sweep]]\nfamily = "logits"\nN = [4]\nV = []\n', "'sweep[0].V' is an empty list"),
    ('name = "x"\n[[sweep]]\nfamily = "logits"\nN = ["4"]\nV = [8]\n', "'sweep[0].N' has '4'"),
    ('name = "x"\n[[sweep]]\nfamily = "linear"\nN = [4]\nV = [8]\n', "'sweep[0].H' is missing"),
    ('name = "x"\ncolour = 3\n[[sweep]]\nfamily = "logits"\nN = [4]\nV = [8]\n', "unknown key 'colour'"),
    ('name = "x"\n', "'sweep' is missing"),
    ('name = "x"\n[[sweep]]\nfamily = "logits"\nN = [0]\nV = [8]\n', "N must be a positive integer"),
    ('name = "x"\n[[sweep]]\nfamily = "logits"\nN = [4]\nV = [8]\nmodes = ["fwd"]\n', "'sweep[0].modes'"),
    ('name = "x"\n[timing]\nwarmup = "a"\n[[sweep]]\nfamily = "logits"\nN = [4]\nV = [8]\n', "'timing.warmup'"),
    ('name = [\n', "not valid TOML"),
])
def test_bad_suite_names_file_and_key(tmp_path, body, expected):
    path = _write(tmp_path, body)
    with pytest.raises(suites.SuiteError) as err:
        suites.load(str(path))
    assert str(path) in str(err.value) and expected in str(err.value)


def test_batch_times_seq_gives_tokens(tmp_path):
    path = _write(tmp_path, 'name = "x"\n[[sweep]]\nfamily = "logits"\nbatch = [2, 4]\nseq = [1024]\nV = [8]\n')
    assert [c.N for c, _, _ in suites.load(str(path)).cells()] == [2048, 4096]


def test_unknown_suite_lists_known():
    with pytest.raises(suites.SuiteError, match="smoke"):
        suites.load("no-such-suite")


def test_take_measures_a_cell_again_under_its_own_id(tmp_path):
    path = tmp_path / "stab.toml"
    path.write_text('name = "stab"\n[[sweep]]\nfamily = "logits"\nN = [8]\nV = [16]\ntake = [1, 2]\n')
    first, second = (case for case, _, _ in suites.load(str(path)).cells())
    assert (first.take, second.take) == (1, 2) and second.id == first.id + " take=2"
    assert {k: v for k, v in first.as_dict().items() if k != "take"} == \
        {k: v for k, v in second.as_dict().items() if k != "take"}  # only the take differs
    from cebench.cases import make_inputs
    assert all(torch.equal(a, b) for a, b in zip(make_inputs(first, "cpu").values(), make_inputs(second, "cpu").values(),
                                                 strict=True))  # and the inputs are the very same
    path.write_text('name = "stab"\n[[sweep]]\nfamily = "logits"\nN = [8]\nV = [16]\ntake = [0]\n')
    with pytest.raises(suites.SuiteError, match="take must be a positive integer"):
        suites.load(str(path))
