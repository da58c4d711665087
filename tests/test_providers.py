"""Kernel providers as plug-ins: a third-party one installed with pip, and `pyimport`."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import JupyverseServer, serving
from .kernel_client import KernelClient

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.anyio

FIXTURE = Path(__file__).parent / "fixtures" / "fps_demo_provider"


def build_wheel(source: Path, out: Path) -> Path:
    """A wheel of a pure-Python package from its pyproject.toml, without a build backend."""
    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    dist_info = f"{name}-{version}.dist-info"
    files: dict[str, bytes] = {
        str(path.relative_to(source)): path.read_bytes()
        for path in sorted((source / name).rglob("*.py"))
    }
    entry_points = "".join(
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items()) + "\n"
        for group, points in project.get("entry-points", {}).items()
    )
    files[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    )
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: fps_kernels-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n"
    )
    files[f"{dist_info}/entry_points.txt"] = entry_points.encode()
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = out / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


class PluginServer(JupyverseServer):
    """A jupyverse that also sees the packages installed in `site`."""

    def __init__(self, home: Path, site: Path, **kwargs: object) -> None:
        super().__init__(home, **kwargs)  # type: ignore[arg-type]
        self.site = site

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env["PYTHONPATH"] = os.pathsep.join([str(self.site), env["PYTHONPATH"]])
        return env


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo provider, installed with pip into a folder of its own (so that the
    environment other tests run in is left as it is)."""
    build = tmp_path_factory.mktemp("demo-wheel")
    target = tmp_path_factory.mktemp("demo-site")
    wheel = build_wheel(FIXTURE, build)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
        + ["--target", str(target), str(wheel)],
        check=True,
        timeout=120,
    )
    assert (target / "fps_demo_provider-0.1.0.dist-info" / "entry_points.txt").is_file()
    return target


@pytest.fixture(scope="module")
def plugin_server(
    site: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JupyverseServer]:
    # The default `providers` ("spec", "external", "gateway", "*"): nothing to turn on but
    # the provider's own options.
    srv = PluginServer(
        tmp_path_factory.mktemp("jupyverse-providers"),
        site,
        kernels={"provider_options": {"demo": {"greeting": "bonjour"}}},
    )
    yield from serving(srv)


async def test_a_third_party_provider_shows_up_through_its_entry_point(
    plugin_server: JupyverseServer,
) -> None:
    srv = plugin_server
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
        specs = (await http.get("/api/kernelspecs")).json()
        assert specs["default"] == "python3"
        assert specs["kernelspecs"]["demo-python"]["spec"]["display_name"] == (
            "Demo Python (bonjour)"
        )
        assert specs["kernelspecs"]["python3"]["spec"]["display_name"] == "Python 3 (ipykernel)"
        response = await http.post("/api/kernels", json={"name": "demo-python"})
        assert response.status_code == 201, response.text
        kernel = response.json()
        assert kernel["name"] == "demo-python"
        client = await KernelClient.connect(srv.ws_url, kernel["id"])
        _msgs, stdout = await client.run("import os; print(os.environ['DEMO_GREETING'])")
        assert stdout == "bonjour\n"
        await client.close()
        assert (await http.delete(f"/api/kernels/{kernel['id']}")).status_code == 204
    log = srv.read_log()
    assert "Kernel provider 'demo' (fps_demo_provider:DemoProvider)" in log
    assert "Kernel provider 'broken' (fps_demo_provider:NotAProvider) is not a Kernel" in log


async def test_pyimport_needs_no_kernelspec(tmp_path: Path) -> None:
    srv = JupyverseServer(tmp_path, kernels={"providers": ["pyimport"]})
    srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            specs = (await http.get("/api/kernelspecs")).json()
            assert list(specs["kernelspecs"]) == ["pyimport-python3"]
            assert specs["default"] == "pyimport-python3"
            spec = specs["kernelspecs"]["pyimport-python3"]
            assert spec["spec"]["argv"][0] == sys.executable
            assert (await http.get(spec["resources"]["logo-64x64"])).status_code == 200
            body = {"path": "x.ipynb", "type": "notebook"}  # no kernel name: the default
            session = (await http.post("/api/sessions", json=body)).json()
            assert session["kernel"]["name"] == "pyimport-python3"
            client = await KernelClient.connect(srv.ws_url, session["kernel"]["id"])
            _msgs, stdout = await client.run("import sys; print(sys.executable)")
            assert stdout == f"{sys.executable}\n"
            await client.close()
    finally:
        srv.stop()
