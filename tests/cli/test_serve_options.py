"""``moqe-serve`` refuses option values it cannot serve with (non-finite numbers, ports outside
0..65535, unknown log levels) and addresses it cannot listen on, as one line and a documented
exit code, before anything loads."""

import socket

import pytest

from moqe_compile.cli import serve as serve_cli
from moqe_compile.cli.common import USAGE
from moqe_compile.errors import ConfigError

pytest.importorskip("uvicorn")


@pytest.mark.parametrize("flag,value", [
    ("--max-delay-ms", "inf"), ("--max-delay-ms", "nan"), ("--max-delay-ms", "1e+300"),
    ("--max-queue-wait-ms", "nan"), ("--max-queue-wait-ms", "inf"),
    ("--body-timeout-s", "nan"), ("--body-timeout-s", "inf"), ("--body-timeout-s", "0"),
    ("--max-body-mb", "nan"), ("--max-body-mb", "inf"), ("--max-body-mb", "-1"),
    ("--num-cpus", "nan"),
    ("--port", "70000"), ("--port", "65536"), ("--port", "-1"),
    ("--max-batch", "0"), ("--max-in-flight", "0"),
])
def test_out_of_range_values_are_a_config_error_naming_the_value(flag, value, capsys):
    # Checked before the bundle is read: the path need not exist.
    assert serve_cli.main(["no-such-bundle", flag, value]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert err.startswith(f"moqe-serve: error: {flag} {value} is out of range: give a")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_message_gives_the_range():
    with pytest.raises(ConfigError, match=r"^--port 70000 is out of range: give a port number from 0 to 65535\.$"):
        serve_cli._check_range("port", 70000, *serve_cli.RANGES["port"])
    with pytest.raises(ConfigError, match=r"^--max-delay-ms inf is out of range: give a number of milliseconds "
                                          r"from 0 to 60000\.$"):
        serve_cli._check_range("max_delay_ms", float("inf"), *serve_cli.RANGES["max_delay_ms"])


@pytest.mark.parametrize("argv", [["--port", "0"], ["--port", "65535"], ["--max-delay-ms", "0"],
                                  ["--max-queue-wait-ms", "0"], ["--log-level", "INFO"]])
def test_values_at_the_ends_of_the_ranges_are_taken(argv, monkeypatch):
    import moqe_compile.serving.server as server

    seen = {}
    monkeypatch.setattr(server, "check_servable", lambda bundle: None)
    monkeypatch.setattr(server, "serve", lambda bundle, cfg, queue, **kw: seen.setdefault("cfg", cfg))
    assert serve_cli.main(["b", *argv]) == 0
    assert seen["cfg"].log_level in serve_cli.LOG_LEVELS


def test_an_unknown_log_level_is_a_usage_error_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as e:
        serve_cli.main(["b", "--log-level", "bogus"])
    assert e.value.code == USAGE and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_a_port_in_use_is_a_config_error_before_the_bundle_loads(tiny_bundle, capsys, monkeypatch):
    import moqe_compile.serving.server as server

    monkeypatch.setattr(server, "open_runtime", lambda *a, **k: pytest.fail("loaded the bundle"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve_cli.main([str(tiny_bundle), "--port", str(port)]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert err.startswith(f"moqe-serve: error: cannot listen on --host 127.0.0.1 --port {port}: ")
    assert "another process listens there" in err and "Traceback" not in err


def test_a_host_that_is_not_this_machines_is_a_config_error(tiny_bundle, capsys, monkeypatch):
    import moqe_compile.serving.server as server

    monkeypatch.setattr(server, "open_runtime", lambda *a, **k: pytest.fail("loaded the bundle"))
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never assigned to a machine, so never bindable.
    assert serve_cli.main([str(tiny_bundle), "--host", "192.0.2.1", "--port", "0"]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert "--host 192.0.2.1" in err and "not an address of this machine" in err


def test_bind_socket_binds_a_free_port_for_port_0():
    from moqe_compile.serving.server import bind_socket

    with bind_socket("127.0.0.1", 0) as s:
        assert s.getsockname()[1] > 0
