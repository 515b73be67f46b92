"""The deployment files (docker/) are safe by default: checked by reading them, as no Docker engine runs here.

* every port compose publishes binds the loopback interface (127.0.0.1, or a variable defaulting to it);
* no password is written in the files: each secret is a required variable (``${VAR:?message}``);
* the Prefect server requires basic auth and every client service sends it;
* the worker image copies every package ``pyproject.toml`` installs (``cli`` with the ``align`` entry point).
"""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from tests.conftest import ROOT

DOCKER = ROOT / "docker"
REQUIRED_VAR = re.compile(r"^\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):\?[^}]*\}$")
LOOPBACK_VAR = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*:-127\.0\.0\.1\}$")
SECRET_KEY = re.compile(r"PASSWORD|AUTH_STRING|SECRET|TOKEN|API_KEY", re.IGNORECASE)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "KEY=value" list form
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _host_ip(port: str | dict) -> str | None:
    """The host address of a published port, or None when the mapping names none (= every interface)."""
    if isinstance(port, dict):  # long syntax
        return port.get("host_ip")
    text = str(port)
    # [HOST_IP:]HOST_PORT:CONTAINER_PORT, where HOST_IP may be a ${VAR:-default} that itself holds colons
    if text.startswith("${"):
        end = text.index("}") + 1
        return text[:end] if text[end:].count(":") == 2 else None
    parts = text.split(":")
    return parts[0] if len(parts) == 3 else None


def test_every_published_port_binds_loopback(compose):
    published = [(name, p) for name, svc in compose["services"].items() for p in svc.get("ports", [])]
    assert published, "expected the Prefect server's port to be published"
    for name, port in published:
        host_ip = _host_ip(port)
        assert host_ip is not None, f"{name}: port {port!r} is published on every interface"
        assert host_ip == "127.0.0.1" or LOOPBACK_VAR.match(host_ip), (
            f"{name}: port {port!r} binds {host_ip!r}, not 127.0.0.1 (or a variable defaulting to it)")


def test_host_ip_parsing():
    assert _host_ip("4200:4200") is None
    assert _host_ip("0.0.0.0:4200:4200") == "0.0.0.0"
    assert _host_ip("127.0.0.1:4200:4200") == "127.0.0.1"
    assert _host_ip("${BIND:-127.0.0.1}:4200:4200") == "${BIND:-127.0.0.1}"
    assert not LOOPBACK_VAR.match("${BIND:-0.0.0.0}")
    assert _host_ip({"target": 4200, "published": 4200}) is None


def test_no_literal_passwords(compose):
    """Every secret-looking variable, and every password inside a URL, is a required ${VAR:?...}."""
    for name, svc in compose["services"].items():
        for key, value in _environment(svc).items():
            if SECRET_KEY.search(key) and value:
                # a secret is either required or passed through empty-by-default from the host
                assert REQUIRED_VAR.match(value) or re.fullmatch(r"\$\{[A-Za-z_0-9]+:-\}", value), (
                    f"{name}.{key} = {value!r}: a literal or defaulted secret")
            for userinfo in re.findall(r"://[^/@\s]*?:([^@\s]+)@", value):  # scheme://user:PASSWORD@host
                assert REQUIRED_VAR.match(userinfo), f"{name}.{key}: the URL's password {userinfo!r} is literal"
    assert REQUIRED_VAR.match(_environment(compose["services"]["postgres"])["POSTGRES_PASSWORD"])


def test_prefect_api_requires_auth_and_clients_send_it(compose):
    services = compose["services"]
    server = _environment(services["prefect-server"])
    match = REQUIRED_VAR.match(server.get("PREFECT_SERVER_API_AUTH_STRING", ""))
    assert match, "the Prefect server must require PREFECT_SERVER_API_AUTH_STRING"
    for name, svc in services.items():
        env = _environment(svc)
        if "PREFECT_API_URL" in env:  # a client of the server
            client = REQUIRED_VAR.match(env.get("PREFECT_API_AUTH_STRING", ""))
            assert client and client["name"] == match["name"], f"{name} does not send the API auth string"
    readme = (DOCKER / "README.md").read_text(encoding="utf-8")
    assert "PREFECT_SERVER_API_AUTH_STRING" in readme and "PREFECT_API_AUTH_STRING" in readme
    assert "POSTGRES_PASSWORD" in readme


def _package_folders() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.rstrip("*").rstrip(".") for pattern in include})


def test_worker_image_copies_every_package():
    packages = _package_folders()
    assert "cli" in packages and "alignment" in packages
    copies: list[tuple[list[str], str]] = []
    lines = (DOCKER / "Dockerfile.worker").read_text(encoding="utf-8").splitlines()
    for line in lines:
        words = line.split()
        if words and words[0].upper() == "COPY":
            args = [w for w in words[1:] if not w.startswith("--")]
            copies.append((args[:-1], args[-1]))
    copied = {src.rstrip("/") for sources, _ in copies for src in sources}
    if "." not in copied:  # `COPY . .` would copy them all
        missing = [p for p in packages if p not in copied]
        assert not missing, f"docker/Dockerfile.worker does not COPY {missing} (pyproject's packages.find)"
    for pkg in packages:
        assert (ROOT / pkg / "__init__.py").is_file(), f"{pkg} is listed in pyproject but is not a package here"
    # every package is in place before `pip install .` reads them
    install = next(i for i, line in enumerate(lines) if re.match(r"RUN pip install \.(\s|$)", line.strip()))
    for pkg in packages:
        copy_line = next(i for i, line in enumerate(lines) if re.match(rf"COPY {pkg}(/)? ", line.strip()))
        assert copy_line < install, f"COPY {pkg} comes after `pip install .`"


def test_the_worker_tracks_to_the_mlflow_service(compose):
    services = compose["services"]
    assert _environment(services["worker"])["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "mlflow" in services["worker"]["depends_on"]
    command = services["mlflow"]["command"]
    assert command[command.index("--port") + 1] == "5000" and "--allowed-hosts" in command
    assert services["mlflow"]["image"].endswith(":v3.17.2")  # the version pyproject pins
