"""``trialtwin train``: the subcommand is registered in the one CLI and parses its options."""
import pytest

from inference import cli_train
from inference.registry import DEFAULT_MODELS_DIR
from inference.training.dropout import DEFAULT_SEED

pytestmark = pytest.mark.unit


def test_registered_in_the_trialtwin_cli():
    from fhir_ops.cli import COMMANDS, build_parser

    assert ("train", "inference.cli_train") in COMMANDS
    args = build_parser().parse_args(["train", "dropout", "--seed", "3", "--out", "/tmp/x"])
    assert (args.model, args.seed, args.out) == ("dropout", 3, "/tmp/x") and args._run is cli_train.run
    defaults = build_parser().parse_args(["train", "dropout"])
    assert defaults.seed == DEFAULT_SEED and defaults.out == str(DEFAULT_MODELS_DIR)


def test_unknown_model_is_refused(capsys):
    from fhir_ops.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "emulator"])
    assert "invalid choice: 'emulator'" in capsys.readouterr().err
