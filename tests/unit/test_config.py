from pathlib import Path

import pytest

from store import config
from store.errors import ConfigError


def test_defaults_without_file() -> None:
    cfg = config.load(None)
    assert cfg.cache.memory_mb == 256
    assert cfg.registry.deadline == 60.0


def test_values_are_read_and_typed(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[registry]\nplain_http = ["r:5000"]\ndeadline = 5\n[cache]\nmemory_mb = 8\n')
    cfg = config.load(p)
    assert cfg.registry.plain_http == ("r:5000",)
    assert cfg.registry.deadline == 5.0 and isinstance(cfg.registry.deadline, float)
    assert cfg.cache.memory_mb == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[cache]\nmemory = 1\n", "unknown setting cache.memory"),
        ("[nope]\n", "unknown section [nope]"),
        ('[cache]\nmemory_mb = "big"\n', "cache.memory_mb must be a int"),
        ("[cache]\nmemory_mb = -1\n", "must not be negative"),
        ("[registry]\ninsecure = 3\n", "registry.insecure must be a list"),
        ("[cache\n", "cannot read config file"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        config.load(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "absent.toml")


def test_shipped_example_is_valid_and_documents_the_defaults() -> None:
    example = Path(__file__).resolve().parents[2] / "contrib" / "config.toml"
    assert config.load(example) == config.Config()
