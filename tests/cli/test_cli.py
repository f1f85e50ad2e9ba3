from orchestrator.cli import main


def test_bad_yaml_fails_with_file_and_key(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epochs: 3\n  colour: blue\n")
    assert main(["finetune", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "train.colour" in err


def test_out_of_range_override_fails(capsys):
    assert main(["zeroshot", "--set", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_zeroshot_prints_a_row_per_split(capsys):
    assert main(["zeroshot"]) == 0
    out = capsys.readouterr().out
    for col in ("heldout", "test", "rotate", "rendered", "shift_mean"):
        assert col in out
