"""``trialtwin train``: the subcommand is registered in the one CLI and parses its options."""
import pytest

from inference import cli_train
from inference.registry import DEFAULT_MODELS_DIR

pytestmark = pytest.mark.unit


def test_registered_in_the_trialtwin_cli():
    from fhir_ops.cli import COMMANDS, build_parser

    assert ("train", "inference.cli_train") in COMMANDS
    args = build_parser().parse_args(["train", "dropout", "--seed", "3", "--out", "/tmp/x"])
    assert (args.model, args.seed, args.out) == ("dropout", 3, "/tmp/x") and args._run is cli_train.run
    defaults = build_parser().parse_args(["train", "dropout"])
    assert defaults.seed is None and defaults.out == str(DEFAULT_MODELS_DIR)  # None: the model's own seed
    assert build_parser().parse_args(["train", "withdrawal"]).model == "withdrawal"


def test_unknown_model_is_refused(capsys):
    from fhir_ops.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "emulator"])
    assert "invalid choice: 'emulator'" in capsys.readouterr().err


@pytest.mark.slow
def test_train_withdrawal_writes_a_model_the_registry_serves(tmp_path, capsys):
    """``trialtwin train withdrawal`` with the committed seed: the registry in the output folder serves it, and
    its held-out C-index is the committed model's (the training is deterministic)."""
    import json

    from fhir_ops.cli import build_parser
    from inference.registry import ModelRegistry

    args = build_parser().parse_args(["train", "withdrawal", "--out", str(tmp_path)])
    assert cli_train.run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    committed = ModelRegistry(DEFAULT_MODELS_DIR).get("withdrawal")
    trained = ModelRegistry(tmp_path).get("withdrawal")
    assert summary["model"] == f"withdrawal-{committed.version}" == f"withdrawal-{trained.version}"
    assert trained.metadata["validation"]["c_index"] == pytest.approx(committed.metadata["validation"]["c_index"],
                                                                     abs=1e-6)
