"""The offline model catalog: shipped data, lookups, parameters, and loading."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from aicortex import _catalog
from aicortex._catalog import (
    Catalog,
    FamilyFile,
    ModelInfo,
    ParamRange,
    ServerEntry,
    default_catalog,
    metadata_dir,
)
from aicortex._exceptions import ModelNotFoundError, ValidationError

REPO_METADATA = Path(__file__).resolve().parents[1] / "metadata"
FAMILIES = ["deepseek", "gemma", "llama", "mistral", "qwen"]
REQUIRED_PARAMS = {"temperature", "top_p", "top_k", "repeat_penalty", "num_ctx"}
INT_PARAMS = {"top_k", "num_ctx", "num_predict"}


# --------------------------------------------------------------------------- helpers


def model_dict(name: str, family: str, **overrides: Any) -> dict[str, Any]:
    """A valid model entry, with some fields replaced."""
    entry: dict[str, Any] = {
        "name": name,
        "family": family,
        "size": "1.0GB",
        "parameters": "1.0B",
        "quantization": "Q4_K_M",
        "context_length": 8192,
        "description": "A test model.",
        "tags": ["chat"],
        "servers": [{"url": "http://localhost:11434", "status": "unknown"}],
        "generation": {
            "temperature": {"default": 0.7, "min": 0.0, "max": 1.5},
            "top_k": {"default": 40, "min": 1, "max": 100},
            "num_ctx": {"default": 4096, "min": 2048, "max": 8192},
        },
    }
    entry.update(overrides)
    return entry


def write_family(directory: Path, family: str, *models: dict[str, Any]) -> Path:
    """Write ``<family>.json`` into ``directory``."""
    path = directory / f"{family}.json"
    path.write_text(json.dumps({"family": family, "models": list(models)}), encoding="utf-8")
    return path


@pytest.fixture
def shipped(monkeypatch: pytest.MonkeyPatch) -> Catalog:
    """A fresh catalog over the repository's metadata/ folder."""
    monkeypatch.delenv("AICORTEX_METADATA_DIR", raising=False)
    return Catalog(REPO_METADATA)


@pytest.fixture
def small(tmp_path: Path) -> Catalog:
    """A catalog of two tiny families in a temporary directory."""
    write_family(
        tmp_path,
        "alpha",
        model_dict("alpha:1b", "alpha"),
        model_dict("alpha:7b", "alpha"),
    )
    write_family(tmp_path, "beta", model_dict("beta:2b", "beta"))
    return Catalog(tmp_path)


# --------------------------------------------------------------------------- shipped data


@pytest.mark.parametrize("family", FAMILIES)
def test_every_shipped_family_file_validates_with_at_least_four_models(family: str) -> None:
    """Each shipped metadata/<family>.json matches the schema and lists 4+ models."""
    path = REPO_METADATA / f"{family}.json"
    parsed = FamilyFile.from_dict(json.loads(path.read_text(encoding="utf-8")))
    assert parsed.family == family
    assert len(parsed.models) >= 4


def test_shipped_catalog_loads_without_errors(shipped: Catalog) -> None:
    """The shipped catalog loads every family and reports no problems."""
    assert shipped.errors == []
    assert shipped.families() == FAMILIES


@pytest.mark.parametrize("path", sorted(REPO_METADATA.glob("*.json")), ids=lambda p: p.name)
def test_shipped_files_are_pretty_printed(path: Path) -> None:
    """Shipped JSON uses 2-space indentation and ends with a newline."""
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"


def test_shipped_facts_for_llama3_2_3b(shipped: Catalog) -> None:
    """llama3.2:3b carries the figures the Ollama library lists."""
    info = shipped.model_info("llama3.2:3b")
    assert info.family == "llama"
    assert info.context_length == 131072
    assert info.parameters == "3.2B"
    assert info.size == "2.0GB"
    assert info.quantization == "Q4_K_M"
    assert info.servers == [ServerEntry(url="http://localhost:11434", status="unknown")]


@pytest.mark.parametrize(
    ("name", "context_length"),
    [
        ("gemma3:1b", 32768),
        ("gemma3:4b", 131072),
        ("deepseek-r1:7b", 131072),
        ("qwen2.5:7b", 32768),
        ("mistral:7b", 32768),
        ("llama3:8b", 8192),
    ],
)
def test_shipped_context_lengths(shipped: Catalog, name: str, context_length: int) -> None:
    """Well-known models have their real context window."""
    assert shipped.model_info(name).context_length == context_length


def test_exactly_one_shipped_model_is_the_default(shipped: Catalog) -> None:
    """Only llama3.2:3b is flagged default, and default_model() returns it."""
    flagged = [n for n in shipped.models() if shipped.model_info(n).default]
    assert flagged == ["llama3.2:3b"]
    assert shipped.default_model() == "llama3.2:3b"


def test_shipped_generation_parameters_are_complete_and_typed(shipped: Catalog) -> None:
    """Every shipped model has the core parameters, ints for integer ones, num_ctx sized."""
    for name in shipped.models():
        info = shipped.model_info(name)
        assert info.generation.keys() >= REQUIRED_PARAMS, name
        for key, r in info.generation.items():
            assert isinstance(r.default, int) is (key in INT_PARAMS), (name, key)
        num_ctx = info.generation["num_ctx"]
        assert num_ctx.default == 4096, name
        assert num_ctx.max == info.context_length, name


def test_shipped_family_defaults_follow_vendor_recommendations(shipped: Catalog) -> None:
    """Reasoning and Gemma 3 models use their vendors' recommended sampling."""
    assert shipped.llm_params("deepseek-r1:7b")["temperature"] == 0.6
    qwen3 = shipped.llm_params("qwen3:8b")
    assert (qwen3["temperature"], qwen3["top_p"], qwen3["top_k"]) == (0.6, 0.95, 20)
    gemma3 = shipped.llm_params("gemma3:4b")
    assert (gemma3["temperature"], gemma3["top_p"], gemma3["top_k"]) == (1.0, 0.95, 64)


# --------------------------------------------------------------------------- listing


def test_families_are_sorted(tmp_path: Path) -> None:
    """families() is alphabetical whatever the file names are."""
    write_family(tmp_path, "zeta", model_dict("zeta:1b", "zeta"))
    (tmp_path / "a-first.json").write_text(
        json.dumps({"family": "omega", "models": [model_dict("omega:1b", "omega")]}),
        encoding="utf-8",
    )
    write_family(tmp_path, "beta", model_dict("beta:1b", "beta"))
    assert Catalog(tmp_path).families() == ["beta", "omega", "zeta"]


def test_models_filters_by_family_in_file_order(small: Catalog) -> None:
    """models(family) lists that family's models in file order."""
    assert small.models("alpha") == ["alpha:1b", "alpha:7b"]
    assert small.models("beta") == ["beta:2b"]


def test_models_without_family_lists_every_model(small: Catalog) -> None:
    """models() lists all models, families in sorted order."""
    assert small.models() == ["alpha:1b", "alpha:7b", "beta:2b"]


def test_unknown_family_raises_validation_error_listing_families(small: Catalog) -> None:
    """An unknown family is a ValidationError that names the known families."""
    with pytest.raises(ValidationError, match=r"Known families: alpha, beta"):
        small.models("gamma")


# --------------------------------------------------------------------------- lookups


def test_model_info_unknown_raises_with_suggestions(shipped: Catalog) -> None:
    """An unknown model raises ModelNotFoundError carrying close names."""
    with pytest.raises(ModelNotFoundError) as caught:
        shipped.model_info("llama3.2:7b")
    error = caught.value
    assert error.model == "llama3.2:7b"
    assert error.suggestions[:2] == ["llama3.2:1b", "llama3.2:3b"]
    assert "'llama3.2:3b'" in str(error)


def test_model_info_typo_suggests_the_intended_model(shipped: Catalog) -> None:
    """A misspelt name suggests the model it was meant to be, first."""
    with pytest.raises(ModelNotFoundError) as caught:
        shipped.model_info("gema3:4b")
    assert caught.value.suggestions[0] == "gemma3:4b"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("llama3.2:3b", "llama3.2:3b"),
        ("LLaMA3.2:3B", "llama3.2:3b"),
        ("  qwen3:8b ", "qwen3:8b"),
        ("solo", "solo:latest"),
        ("Solo", "solo:latest"),
        ("alpha:1b:latest", "alpha:1b"),
    ],
)
def test_find_is_lenient(tmp_path: Path, query: str, expected: str) -> None:
    """find() ignores case and surrounding space, and adds or drops ``:latest``."""
    write_family(
        tmp_path,
        "alpha",
        model_dict("alpha:1b", "alpha"),
        model_dict("llama3.2:3b", "alpha"),
        model_dict("qwen3:8b", "alpha"),
        model_dict("solo:latest", "alpha"),
    )
    info = Catalog(tmp_path).find(query)
    assert info is not None
    assert info.name == expected


def test_find_returns_none_for_unknown_models(small: Catalog) -> None:
    """find() returns None rather than raising."""
    assert small.find("nothing:1b") is None
    assert small.find("") is None


def test_find_prefers_the_exact_spelling(tmp_path: Path) -> None:
    """An exact match wins over a case-insensitive one."""
    write_family(tmp_path, "alpha", model_dict("Mix:1b", "alpha"), model_dict("mix:1b", "alpha"))
    info = Catalog(tmp_path).find("mix:1b")
    assert info is not None
    assert info.name == "mix:1b"


def test_model_servers_lists_the_catalog_servers(tmp_path: Path) -> None:
    """model_servers() returns the entries in file order."""
    servers = [
        {"url": "http://gpu:11434", "status": "up"},
        {"url": "http://cpu:11434", "status": "down"},
    ]
    write_family(tmp_path, "alpha", model_dict("alpha:1b", "alpha", servers=servers))
    assert Catalog(tmp_path).model_servers("alpha:1b") == [
        ServerEntry(url="http://gpu:11434", status="up"),
        ServerEntry(url="http://cpu:11434", status="down"),
    ]


def test_model_servers_unknown_model_raises(small: Catalog) -> None:
    """model_servers() of an unknown model raises ModelNotFoundError."""
    with pytest.raises(ModelNotFoundError):
        small.model_servers("gamma:1b")


def test_suggestions_list_models_sharing_the_base_name(shipped: Catalog) -> None:
    """A bare family-and-version name suggests every tag of it."""
    assert shipped.suggestions("llama3.2")[:2] == ["llama3.2:1b", "llama3.2:3b"]
    assert shipped.suggestions("deepseek-r1", limit=3) == [
        "deepseek-r1:1.5b",
        "deepseek-r1:7b",
        "deepseek-r1:8b",
    ]


def test_suggestions_merge_extra_names_without_duplicates(small: Catalog) -> None:
    """Names from servers join the catalog's, each once, closest first."""
    result = small.suggestions("alpha:3b", extra=["alpha:3b-q8_0", "alpha:1b", "zzz:1b"])
    assert result[0] == "alpha:3b-q8_0"
    assert sorted(result) == ["alpha:1b", "alpha:3b-q8_0", "alpha:7b"]


def test_suggestions_respect_limit_and_skip_unrelated_names(small: Catalog) -> None:
    """At most ``limit`` names come back, and nothing unrelated."""
    assert small.suggestions("alpha", limit=1) == ["alpha:1b"]
    assert small.suggestions("alpha", limit=0) == []
    assert small.suggestions("completely-different") == []


# --------------------------------------------------------------------------- parameters


def test_llm_params_returns_the_defaults(shipped: Catalog) -> None:
    """llm_params() is the generation defaults, each within its range."""
    params = shipped.llm_params("llama3.2:3b")
    assert params == {
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 40,
        "repeat_penalty": 1.1,
        "num_ctx": 4096,
    }
    generation = shipped.model_info("llama3.2:3b").generation
    for key, value in params.items():
        assert generation[key].min <= value <= generation[key].max


def test_random_llm_params_same_seed_same_result(shipped: Catalog) -> None:
    """The same seed draws the same parameters."""
    first = shipped.random_llm_params("qwen3:8b", seed=7)
    assert first == shipped.random_llm_params("qwen3:8b", seed=7)


def test_random_llm_params_different_seeds_differ(shipped: Catalog) -> None:
    """Different seeds draw different parameters."""
    draws = {tuple(shipped.random_llm_params("qwen3:8b", seed=s).items()) for s in range(5)}
    assert len(draws) == 5


@pytest.mark.parametrize("name", ["llama3.2:3b", "gemma3:12b", "deepseek-r1:14b", "mixtral:8x7b"])
def test_random_llm_params_stay_in_range_and_keep_types(shipped: Catalog, name: str) -> None:
    """Every drawn value lies in its range; integer parameters stay ints."""
    generation = shipped.model_info(name).generation
    for seed in range(50):
        params = shipped.random_llm_params(name, seed=seed)
        assert params.keys() == generation.keys()
        for key, value in params.items():
            r = generation[key]
            assert r.min <= value <= r.max
            assert type(value) is (int if key in INT_PARAMS else float)
            if isinstance(value, float):
                assert round(value, 3) == value


def test_random_llm_params_do_not_depend_on_key_order(tmp_path: Path) -> None:
    """Listing the parameters in another order does not change a seeded draw."""
    params = {
        "temperature": {"default": 0.7, "min": 0.0, "max": 1.5},
        "top_k": {"default": 40, "min": 1, "max": 100},
        "top_p": {"default": 0.9, "min": 0.5, "max": 1.0},
    }
    reordered = dict(reversed(params.items()))
    write_family(
        tmp_path,
        "alpha",
        model_dict("a:1b", "alpha", generation=params),
        model_dict("b:1b", "alpha", generation=reordered),
    )
    catalog = Catalog(tmp_path)
    assert catalog.random_llm_params("a:1b", seed=3) == catalog.random_llm_params("b:1b", seed=3)


def test_param_range_rejects_a_default_outside_its_range() -> None:
    """A default beyond max is refused, naming the numbers."""
    with pytest.raises(ValueError, match=r"min=0\.0, default=2\.5, max=2\.0"):
        ParamRange(default=2.5, min=0.0, max=2.0)


def test_param_range_integer_default_needs_integer_bounds() -> None:
    """An int default with float bounds is refused."""
    with pytest.raises(ValueError, match="must be integers"):
        ParamRange(default=40, min=1.0, max=100)


def test_param_range_refuses_booleans() -> None:
    """JSON ``true`` is not a number here."""
    with pytest.raises(ValueError, match="valid"):
        ParamRange.from_dict({"default": True, "min": 0, "max": 1})


def test_model_info_refuses_num_ctx_beyond_context_length() -> None:
    """generation.num_ctx.max cannot exceed the model's context_length."""
    entry = model_dict("a:1b", "alpha", context_length=4096)
    with pytest.raises(ValueError, match="exceeds context_length"):
        ModelInfo.from_dict(entry)


# --------------------------------------------------------------------------- loading


def test_malformed_json_is_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file that is not JSON is skipped with an error; the others still load."""
    caplog.set_level(logging.ERROR, logger="aicortex")
    (tmp_path / "broken.json").write_text('{"family": "broken", "models": [', encoding="utf-8")
    write_family(tmp_path, "alpha", model_dict("alpha:1b", "alpha"))
    catalog = Catalog(tmp_path)
    assert catalog.models() == ["alpha:1b"]
    assert len(catalog.errors) == 1
    assert "broken.json" in catalog.errors[0]
    assert "not valid JSON" in catalog.errors[0]
    assert any("broken.json" in r.getMessage() for r in caplog.records)
    assert all(r.name == "aicortex" and r.levelno == logging.ERROR for r in caplog.records)


def test_schema_invalid_file_is_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo'd field makes its file fail validation; the error names file and field."""
    caplog.set_level(logging.ERROR, logger="aicortex")
    bad = model_dict("bad:1b", "bad")
    bad["contxt_length"] = bad.pop("context_length")
    write_family(tmp_path, "bad", bad)
    write_family(tmp_path, "alpha", model_dict("alpha:1b", "alpha"))
    catalog = Catalog(tmp_path)
    assert catalog.families() == ["alpha"]
    (message,) = catalog.errors
    assert "bad.json" in message
    assert "models[0].contxt_length" in message
    assert "models[0].context_length" in message
    assert [r.getMessage() for r in caplog.records if "bad.json" in r.getMessage()]


def test_family_mismatch_is_a_schema_error(tmp_path: Path) -> None:
    """A model whose family differs from its file's is rejected with the file."""
    write_family(tmp_path, "alpha", model_dict("alpha:1b", "beta"))
    catalog = Catalog(tmp_path)
    assert catalog.families() == []
    assert "family 'beta'" in catalog.errors[0]


def test_duplicate_name_within_a_file_is_a_schema_error(tmp_path: Path) -> None:
    """The same model twice in one file rejects that file."""
    write_family(tmp_path, "alpha", model_dict("a:1b", "alpha"), model_dict("a:1b", "alpha"))
    catalog = Catalog(tmp_path)
    assert catalog.models() == []
    assert "listed twice" in catalog.errors[0]


def test_model_in_two_families_keeps_the_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A name claimed by two families stays with the first file and is logged."""
    caplog.set_level(logging.ERROR, logger="aicortex")
    write_family(tmp_path, "alpha", model_dict("shared:1b", "alpha"))
    write_family(tmp_path, "beta", model_dict("shared:1b", "beta"), model_dict("b:1b", "beta"))
    catalog = Catalog(tmp_path)
    assert catalog.model_info("shared:1b").family == "alpha"
    assert catalog.models("beta") == ["b:1b"]
    assert "shared:1b" in catalog.errors[0]
    assert any("shared:1b" in r.getMessage() for r in caplog.records)


def test_non_json_files_are_ignored(tmp_path: Path) -> None:
    """Only ``*.json`` files are read."""
    (tmp_path / "README.md").write_text("# notes", encoding="utf-8")
    write_family(tmp_path, "alpha", model_dict("alpha:1b", "alpha"))
    catalog = Catalog(tmp_path)
    assert catalog.models() == ["alpha:1b"]
    assert catalog.errors == []


def test_missing_directory_gives_an_empty_catalog_and_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A directory that does not exist is logged, not raised."""
    caplog.set_level(logging.ERROR, logger="aicortex")
    catalog = Catalog(tmp_path / "nowhere")
    assert catalog.families() == []
    assert "AICORTEX_METADATA_DIR" in catalog.errors[0]
    assert caplog.records


def test_nothing_is_read_before_first_use(tmp_path: Path) -> None:
    """Constructing a catalog reads nothing: files written afterwards are seen."""
    catalog = Catalog(tmp_path)
    write_family(tmp_path, "alpha", model_dict("alpha:1b", "alpha"))
    assert catalog.models() == ["alpha:1b"]


def test_files_are_read_only_once(tmp_path: Path) -> None:
    """After the first use, later changes on disk are not picked up."""
    write_family(tmp_path, "alpha", model_dict("alpha:1b", "alpha"))
    catalog = Catalog(tmp_path)
    assert catalog.families() == ["alpha"]
    write_family(tmp_path, "beta", model_dict("beta:1b", "beta"))
    assert catalog.families() == ["alpha"]


def test_concurrent_first_use_loads_once(small: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads racing on a fresh catalog trigger a single load."""
    real_load = _catalog._load  # pyright: ignore[reportPrivateUsage]
    calls: list[int] = []
    gate = threading.Barrier(8)

    def counting_load(directory: Any) -> Any:
        calls.append(1)
        return real_load(directory)

    monkeypatch.setattr(_catalog, "_load", counting_load)
    results: list[list[str]] = []

    def use() -> None:
        gate.wait()
        results.append(small.models())

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [["alpha:1b", "alpha:7b", "beta:2b"]] * 8


def test_metadata_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AICORTEX_METADATA_DIR points the default catalog location elsewhere."""
    write_family(tmp_path, "custom", model_dict("custom:1b", "custom"))
    monkeypatch.setenv("AICORTEX_METADATA_DIR", str(tmp_path))
    assert metadata_dir() == tmp_path
    assert Catalog().models() == ["custom:1b"]


def test_metadata_dir_without_override_finds_the_shipped_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the variable, the bundled or checkout metadata folder is used."""
    monkeypatch.delenv("AICORTEX_METADATA_DIR", raising=False)
    names = sorted(entry.name for entry in metadata_dir().iterdir())
    assert [f"{family}.json" for family in FAMILIES] == [n for n in names if n.endswith(".json")]


def test_default_model_falls_back_to_the_first_model(small: Catalog) -> None:
    """With no model flagged default, the first model of models() is used."""
    assert small.default_model() == "alpha:1b"


def test_default_model_of_an_empty_catalog_says_what_to_do(tmp_path: Path) -> None:
    """An empty catalog cannot pick a model and tells the user how to choose one."""
    with pytest.raises(ValidationError, match=r"model=.*AICORTEX_MODEL"):
        Catalog(tmp_path).default_model()


def test_a_second_default_flag_is_dropped_and_logged(tmp_path: Path) -> None:
    """Two models flagged default: the first keeps the flag, the second is reported."""
    write_family(tmp_path, "alpha", model_dict("a:1b", "alpha", default=True))
    write_family(tmp_path, "beta", model_dict("b:1b", "beta", default=True))
    catalog = Catalog(tmp_path)
    assert catalog.default_model() == "a:1b"
    assert not catalog.model_info("b:1b").default
    assert "b:1b" in catalog.errors[0]


def test_default_catalog_is_shared() -> None:
    """default_catalog() returns one Catalog per process."""
    assert default_catalog() is default_catalog()
