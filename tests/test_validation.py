"""Bad input gets a clear error before any kernel runs, and the CLI exits 2 for it.

Targets outside [0, V) (other than ignore_index) would be a device-side assert on CUDA
that poisons the process, so cebench.validate rejects them on the host, naming the bad
positions. Sizes, dtypes, suite files and implementation names are checked up front too.
"""

import pytest
import torch

from cebench import cli
from cebench.cases import Case, CaseError, make_inputs
from cebench.validate import InputError, check_inputs, check_tensors


def _logits(n=4, v=8, dtype=torch.float32):
    return torch.randn(n, v, dtype=dtype)


def test_valid_inputs_pass_including_ignore_index_and_int32():
    check_tensors(logits=_logits(), targets=torch.tensor([0, 7, -100, 3]))
    check_tensors(logits=_logits(), targets=torch.tensor([0, 7, -100, 3], dtype=torch.int32))
    case = Case(family="linear", N=6, V=10, H=4, ignore_frac=0.5)
    check_inputs(case, make_inputs(case, "cpu"))


@pytest.mark.parametrize("targets,expected", [
    (torch.tensor([0, 8, 1, 2]), "targets[1]=8"),  # == V
    (torch.tensor([0, 1, -1, 2]), "targets[2]=-1"),  # negative but not ignore_index
    (torch.tensor([0, 1, 2, 99]), "outside [0, V=8)"),
])
def test_targets_out_of_range_are_named(targets, expected):
    with pytest.raises(InputError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check_tensors(logits=_logits(), targets=targets)


def test_many_bad_targets_are_counted():
    with pytest.raises(InputError, match=r"^20 target\(s\).* \.\.\.$"):
        check_tensors(logits=_logits(20), targets=torch.full((20,), 8))


@pytest.mark.parametrize("kwargs,expected", [
    ({"logits": _logits(), "targets": torch.zeros(4)}, "int32 or int64"),
    ({"logits": _logits(), "targets": torch.zeros(5, dtype=torch.long)}, r"1-D \[N\] = \[4\], got shape \(5,\)"),
    ({"logits": _logits(), "targets": torch.zeros(4, 1, dtype=torch.long)}, "got shape"),
    ({"logits": torch.randn(2, 4, 8), "targets": torch.zeros(2, dtype=torch.long)}, r"logits must be 2-D \[N, V\]"),
    ({"logits": _logits(dtype=torch.float64), "targets": torch.zeros(4, dtype=torch.long)}, "unsupported dtype float64"),
    ({"logits": torch.randn(4, 0), "targets": torch.zeros(4, dtype=torch.long)}, "V=0"),
    ({"hidden": torch.randn(4, 3), "weight": torch.randn(8, 5), "targets": torch.zeros(4, dtype=torch.long)},
     r"disagree on H \(3 != 5\)"),
    ({"hidden": torch.randn(4, 3), "weight": torch.randn(8, 3, dtype=torch.bfloat16),
      "targets": torch.zeros(4, dtype=torch.long)}, "share a dtype"),
    ({"targets": torch.zeros(4, dtype=torch.long)}, "give logits, or hidden and weight"),
])
def test_bad_tensors_get_clear_messages(kwargs, expected):
    with pytest.raises(InputError, match=expected):
        check_tensors(**kwargs)


def test_inputs_must_match_their_case():
    case = Case(family="logits", N=4, V=8)
    inputs = make_inputs(case, "cpu")
    with pytest.raises(InputError, match="the case says N=5"):
        check_inputs(Case(family="logits", N=5, V=8), inputs)
    with pytest.raises(InputError, match="the case says bfloat16"):
        check_inputs(Case(family="logits", N=4, V=8, dtype="bfloat16"), inputs)


@pytest.mark.parametrize("kwargs,expected", [
    ({"N": 4.0, "V": 8}, "N must be a non-negative integer, got 4.0"),
    ({"N": 4, "V": 0}, "V must be a positive integer, got 0"),
    ({"N": -3, "V": 8}, "N must be a non-negative integer, got -3"),
    ({"N": 4, "V": 8, "dtype": "float64"}, "dtype must be float32, bfloat16 or float16"),
    ({"N": 4, "V": 8, "reduction": "avg"}, "reduction must be mean, sum or none"),
])
def test_impossible_cases_are_rejected(kwargs, expected):
    with pytest.raises(CaseError, match=expected):
        Case(family="logits", **kwargs)


def _suite(tmp_path, body):
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\n' + body)
    return path


@pytest.mark.parametrize("body,expected", [
    ('[[sweep]]\nfamily = "logits"\nN = [4]\nV = [0]\n', "'sweep[0]' makes an invalid case: V must be a positive integer"),
    ('[[sweep]]\nfamily = "logits"\nN = [-2]\nV = [8]\n', "N must be a positive integer, got -2"),
    ('[[sweep]]\nfamily = "logits"\nN = [0]\nV = [8]\n', "N must be a positive integer, got 0"),
    ('[[sweep]]\nfamily = "logits"\nN = [4]\nV = [8]\ndtype = ["float64"]\n', "dtype must be float32"),
    ('[[sweep]]\nfamily = "logits"\nN = 4.5\nV = [8]\n', "'sweep[0].N' has 4.5; expected a list of positive integers"),
    ('[[sweep]]\nfamily = "logits"\nN = [4]\nV = [8]\nignore_frac = []\n', "'sweep[0].ignore_frac' is an empty list"),
    ('[timing]\nrepeats = 3\n[[sweep]]\nfamily = "logits"\nN = [4]\nV = [8]\n', "unknown key 'timing.repeats'"),
    ('sweep = 3\n', "key 'sweep' must be a list"),
])
def test_bad_suite_exits_2_naming_file_and_key(tmp_path, capsys, body, expected):
    path = _suite(tmp_path, body)
    assert cli.main(["run", "--suite", str(path), "--out", str(tmp_path)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert str(path) in err and expected in err
    assert not list(tmp_path.glob("*/results.csv"))  # nothing ran


def test_unknown_implementation_exits_2_listing_known(tmp_path, capsys):
    path = _suite(tmp_path, '[[sweep]]\nfamily = "logits"\nN = [4]\nV = [8]\n')
    assert cli.main(["run", "--suite", str(path), "--impl", "torch,no_such_impl", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown implementation(s) ['no_such_impl']" in err and "torch" in err.split("known:")[1]


def test_resume_of_a_non_run_directory_exits_2(tmp_path, capsys):
    assert cli.main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_missing_plugin_file_exits_2(tmp_path, capsys):
    assert cli.main(["list", "--plugin", str(tmp_path / "nope.py")]) == 2
    assert "plugin file not found" in capsys.readouterr().err


def test_an_empty_batch_is_valid_input():
    """N = 0 happens in training (the last shard of an epoch); F.cross_entropy accepts it, so validation does."""
    assert check_tensors(logits=torch.randn(0, 8), targets=torch.zeros(0, dtype=torch.long)) == (0, 8)
    assert Case(family="logits", N=0, V=8).N == 0


# -- every error path of cebench.validate, with its whole message ------------------------------------------
LONG = torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize("kwargs,message", [
    ({"logits": [[0.0]], "targets": LONG}, "logits must be a torch.Tensor, got list"),
    ({"logits": torch.zeros(4, 8, dtype=torch.int32), "targets": LONG},
     "logits has unsupported dtype int32; expected one of float32, bfloat16, float16"),
    ({"logits": torch.randn(8), "targets": LONG}, "logits must be 2-D [N, V], got shape (8,)"),
    ({"hidden": torch.randn(4, 3), "targets": LONG}, "give logits, or hidden and weight"),
    ({"weight": torch.randn(8, 3), "targets": LONG}, "give logits, or hidden and weight"),
    ({"hidden": "x", "weight": torch.randn(8, 3), "targets": LONG}, "hidden must be a torch.Tensor, got str"),
    ({"hidden": torch.randn(4, 3), "weight": None, "targets": LONG}, "give logits, or hidden and weight"),
    ({"hidden": torch.randn(4, 3), "weight": 1.0, "targets": LONG}, "weight must be a torch.Tensor, got float"),
    ({"hidden": torch.randn(4, 3), "weight": torch.randn(8, 3, dtype=torch.float64), "targets": LONG},
     "weight has unsupported dtype float64; expected one of float32, bfloat16, float16"),
    ({"hidden": torch.randn(4, 3, 1), "weight": torch.randn(8, 3), "targets": LONG},
     "hidden must be [N, H] and weight [V, H], got (4, 3, 1) and (8, 3)"),
    ({"hidden": torch.randn(4, 3), "weight": torch.randn(8), "targets": LONG},
     "hidden must be [N, H] and weight [V, H], got (4, 3) and (8,)"),
    ({"hidden": torch.randn(4, 3), "weight": torch.randn(8, 5), "targets": LONG},
     "hidden [N, H] = (4, 3) and weight [V, H] = (8, 5) disagree on H (3 != 5)"),
    ({"hidden": torch.randn(4, 0), "weight": torch.randn(8, 0), "targets": LONG}, "H must be positive, got 0"),
    ({"hidden": torch.randn(4, 3, dtype=torch.float16), "weight": torch.randn(8, 3), "targets": LONG},
     "hidden and weight must share a dtype, got torch.float16 and torch.float32"),
    ({"hidden": torch.randn(4, 3), "weight": torch.randn(0, 3), "targets": LONG}, "V must be positive, got N=4, V=0"),
    ({"logits": torch.randn(4, 0), "targets": LONG}, "V must be positive, got N=4, V=0"),
    ({"logits": _logits(), "targets": [0, 1, 2, 3]}, "targets must be a torch.Tensor, got list"),
    ({"logits": _logits(), "targets": torch.zeros(4, dtype=torch.int16)},
     "targets must be int32 or int64 class indices, got int16"),
    ({"logits": _logits(), "targets": torch.zeros(4, dtype=torch.uint8)},
     "targets must be int32 or int64 class indices, got uint8"),
    ({"logits": _logits(), "targets": torch.zeros(2, 2, dtype=torch.long)},
     "targets must be 1-D [N] = [4], got shape (2, 2)"),
    ({"logits": _logits(), "targets": torch.tensor([8, 9, 10, 11])},
     "4 target(s) outside [0, V=8) and not ignore_index=-100: targets[0]=8, targets[1]=9, targets[2]=10, targets[3]=11"),
    ({"logits": _logits(6), "targets": torch.tensor([-5, 1, 8, 9, 10, 11])},
     "5 target(s) outside [0, V=8) and not ignore_index=-100: targets[0]=-5, targets[2]=8, targets[3]=9, targets[4]=10, "
     "targets[5]=11"),
    ({"logits": _logits(6), "targets": torch.full((6,), 8)},
     "6 target(s) outside [0, V=8) and not ignore_index=-100: targets[0]=8, targets[1]=8, targets[2]=8, targets[3]=8, "
     "targets[4]=8 ..."),
    ({"logits": _logits(), "targets": torch.tensor([0, -100, 1, 2]), "ignore_index": -1},
     "1 target(s) outside [0, V=8) and not ignore_index=-1: targets[1]=-100"),
    ({"logits": _logits().to("meta"), "targets": LONG}, "inputs are on different devices: ['cpu', 'meta']"),
    ({"hidden": torch.randn(4, 3), "weight": torch.randn(8, 3, device="meta"), "targets": LONG},
     "inputs are on different devices: ['cpu', 'meta']"),
])
def test_every_bad_call_is_named_exactly(kwargs, message):
    with pytest.raises(InputError) as err:
        check_tensors(**kwargs)
    assert str(err.value) == message


def test_a_custom_ignore_index_is_accepted_and_the_sizes_returned():
    assert check_tensors(logits=_logits(), targets=torch.tensor([0, -1, 7, -1]), ignore_index=-1) == (4, 8)
    assert check_tensors(hidden=torch.randn(5, 3), weight=torch.randn(9, 3), targets=torch.zeros(5, dtype=torch.int32)) \
        == (5, 9)
    assert check_tensors(logits=_logits(5), targets=torch.tensor([-100] * 5)) == (5, 8)  # every target ignored
    assert check_tensors(logits=torch.randn(3, 1), targets=torch.zeros(3, dtype=torch.long)) == (3, 1)  # V=1
    assert check_tensors(hidden=torch.randn(3, 1), weight=torch.randn(1, 1), targets=torch.zeros(3, dtype=torch.long)) \
        == (3, 1)  # H=1 and V=1


@pytest.mark.parametrize("case,inputs,message", [
    (Case("logits", N=4, V=8), {"logits": torch.randn(4, 8)},
     "case logits N=4 V=8 float32 mean: inputs have no 'targets' (got ['logits'])"),
    (Case("linear", N=4, V=8, H=3), {"hidden": torch.randn(4, 2), "weight": torch.randn(8, 2), "targets": LONG},
     "case linear N=4 V=8 H=3 float32 mean: H is 2, the case says 3"),
    (Case("linear", N=4, V=8, H=3), {"hidden": torch.randn(4, 3), "weight": torch.randn(9, 3), "targets": LONG},
     "case linear N=4 V=8 H=3 float32 mean: inputs are N=4, V=9, the case says N=4, V=8"),
    (Case("linear", N=4, V=8, H=3, dtype="float16"),
     {"hidden": torch.randn(4, 3), "weight": torch.randn(8, 3), "targets": LONG},
     "case linear N=4 V=8 H=3 float16 mean: inputs are torch.float32, the case says float16"),
    (Case("logits", N=4, V=8), {"logits": torch.randn(4, 9), "targets": LONG},
     "case logits N=4 V=8 float32 mean: inputs are N=4, V=9, the case says N=4, V=8"),
    (Case("logits", N=4, V=8), {"logits": torch.randn(4, 8), "targets": torch.tensor([0, 1, 2, 8])},
     "1 target(s) outside [0, V=8) and not ignore_index=-100: targets[3]=8"),
    (Case("logits", N=4, V=8), {"logits": torch.randn(4, 8), "targets": torch.tensor([0, 1, -1, 3])},
     "1 target(s) outside [0, V=8) and not ignore_index=-100: targets[2]=-1"),
])
def test_every_case_mismatch_is_named_exactly(case, inputs, message):
    with pytest.raises(InputError) as err:
        check_inputs(case, inputs)
    assert str(err.value) == message


def test_check_inputs_takes_the_ignore_index_and_autocast_inputs():
    case = Case("logits", N=4, V=8)
    check_inputs(case, {"logits": torch.randn(4, 8), "targets": torch.tensor([0, -1, 1, 2])}, ignore_index=-1)
    linear = Case("linear", N=4, V=8, H=3)
    inputs = {"hidden": torch.randn(4, 3), "weight": torch.randn(8, 3), "targets": torch.tensor([0, -1, 1, 2])}
    check_inputs(linear, inputs, ignore_index=-1)
    with pytest.raises(InputError, match="not ignore_index=-100: targets"):
        check_inputs(linear, inputs)
    autocast = Case("linear", N=4, V=8, H=3, dtype="autocast-bfloat16")  # float32 inputs under autocast
    check_inputs(autocast, make_inputs(autocast, "cpu"))
    assert issubclass(InputError, CaseError)
