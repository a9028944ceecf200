"""The app spec: safe YAML loading and validation that reports every error with its path."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from piccolod.apps.spec import (
    MAX_SPEC_BYTES,
    RESERVED_NAMES,
    app_volume_id,
    parse_spec,
    spec_from_json,
    valid_app_name,
)
from piccolod.errors import InvalidCommand

MINIMAL = """
name: web
image: localhost/web:1
listeners:
  - name: http
    guest_port: 80
"""

COMPLETE = """
name: blog
type: system
image: localhost/blog:2
command: [/bin/httpd, -f]
listeners:
  - name: web
    guest_port: 80
    flow: tcp
    protocol: http
    remote_ports: [80, 443]
  - name: ssh
    guest_port: 22
    flow: tls
storage:
  persistent:
    data: {container: /data}
  temporary:
    cache: {container: /cache, size_limit: 16MiB}
environment:
  ENV: test
  PORT: 80
  DEBUG: false
resources:
  limits: {memory: 512MB, cpu: 0.5}
healthcheck:
  http: {path: /health, listener: web, interval: 5, timeout: 2, retries: 2}
depends_on: [db]
permissions:
  network: {internet: allow}
cluster: {mode: stateless_read_only}
x-piccolo: {icon: blog.png}
"""


class SpecTests(SynchronousTestCase):
    def errors(self, text: str | bytes) -> list[str]:
        error = self.assertRaises(InvalidCommand, parse_spec, text)
        self.assertTrue(error.errors, "an InvalidCommand without its errors")
        self.assertEqual(error.status, 400)
        return error.errors

    def test_minimal_spec_gets_defaults(self) -> None:
        """A minimal spec parses with type user, raw tcp listeners and stateful clustering."""
        spec = parse_spec(MINIMAL)
        self.assertEqual(spec.name, "web")
        self.assertEqual(spec.type, "user")
        self.assertEqual(spec.cluster_mode, "stateful")
        self.assertTrue(spec.stateful)
        listener = spec.listeners[0]
        self.assertEqual(
            (listener.flow, listener.protocol, listener.remote_ports), ("tcp", "raw", (80, 443))
        )
        self.assertEqual(spec.resource, "app:web")
        self.assertEqual(spec.image_ref(), "localhost/web:1")

    def test_complete_spec_is_read_field_by_field(self) -> None:
        """Every field of a complete spec is read and normalised."""
        spec = parse_spec(COMPLETE)
        self.assertEqual(spec.type, "system")
        self.assertEqual(spec.command, ("/bin/httpd", "-f"))
        self.assertEqual([x.name for x in spec.listeners], ["web", "ssh"])
        self.assertTrue(spec.listeners[0].http)
        self.assertFalse(spec.listeners[1].http)
        self.assertEqual([(v.name, v.container) for v in spec.persistent], [("data", "/data")])
        self.assertEqual(spec.temporary[0].size, 16 * 1024 * 1024)
        self.assertEqual(dict(spec.environment), {"ENV": "test", "PORT": "80", "DEBUG": "false"})
        self.assertEqual((spec.memory, spec.cpus), (512_000_000, 0.5))
        assert spec.healthcheck is not None
        self.assertEqual(
            (spec.healthcheck.listener, spec.healthcheck.path, spec.healthcheck.retries),
            ("web", "/health", 2),
        )
        self.assertEqual(spec.depends_on, ("db",))
        self.assertEqual(spec.cluster_mode, "stateless_read_only")
        self.assertEqual(spec.document["x-piccolo"], {"icon": "blog.png"})

    def test_normalised_document_round_trips(self) -> None:
        """The stored document validates back to the same spec and fingerprint."""
        spec = parse_spec(COMPLETE)
        again = spec_from_json(spec.document)
        self.assertEqual(again, spec)
        self.assertEqual(again.fingerprint(), spec.fingerprint())
        self.assertNotEqual(parse_spec(MINIMAL).fingerprint(), spec.fingerprint())

    def test_upstream_invalid_specs_report_every_error(self) -> None:
        """The upstream parser cases fail with every problem listed, each with its path."""
        errors = self.errors(
            """
name: api
image: nginx:latest
build: {containerfile: "FROM x"}
listeners:
  - name: web
    guest_port: 0
  - name: web
    guest_port: 70000
storage:
  persistent:
    data:
      container: ../../../etc/passwd
      size_limit: 1GB
"""
        )
        self.assertEqual(
            errors,
            [
                "name: 'api' is reserved (admin, api, piccolo, root, system, www)",
                "image: give image or build, not both",
                "listeners[0].guest_port: must be an integer between 1 and 65535, got 0",
                "listeners[1].name: 'web' is already used by listeners[0]",
                "listeners[1].guest_port: must be an integer between 1 and 65535, got 70000",
                "storage.persistent.data.container: container path must be absolute, "
                "got '../../../etc/passwd'",
                "storage.persistent.data.size_limit: cannot be enforced on persistence "
                "volumes; remove it",
            ],
        )

    def test_missing_name_and_image(self) -> None:
        """A spec without name, image or listeners reports all three."""
        self.assertEqual(
            self.errors("type: user\n"),
            [
                "name: is required",
                "image: one of image or build is required",
                "listeners: is required (at least one listener)",
            ],
        )

    def test_bad_names(self) -> None:
        """Bad characters, leading digits, trailing hyphens and long names are refused."""
        for name in ("Web", "1web", "web-", "we_b", "a" * 51, "w"):
            errors = self.errors(MINIMAL.replace("name: web", f"name: {name}"))
            self.assertTrue(any(e.startswith("name:") for e in errors), (name, errors))
        for name in sorted(RESERVED_NAMES):
            errors = self.errors(MINIMAL.replace("name: web", f"name: {name}"))
            self.assertIn("reserved", errors[0])
            self.assertFalse(valid_app_name(name))
        self.assertTrue(valid_app_name("web-2"))

    def test_path_traversal_in_volumes(self) -> None:
        """Relative, dotted and root container paths and host paths are refused."""
        for path in ("data", "/data/../etc", "/./x", "/"):
            body = MINIMAL + f"storage:\n  persistent:\n    data: {{container: '{path}'}}\n"
            errors = self.errors(body)
            self.assertTrue(errors[0].startswith("storage.persistent.data.container"), errors)
        errors = self.errors(
            MINIMAL + "storage:\n  persistent:\n    data: {container: /d, host: /etc}\n"
        )
        self.assertIn("must not specify host", errors[0])

    def test_conflicting_volume_paths(self) -> None:
        """Two volumes on the same or nested paths conflict."""
        errors = self.errors(
            MINIMAL
            + "storage:\n  persistent:\n    data: {container: /data}\n"
            + "  temporary:\n    tmp: {container: /data/tmp}\n"
        )
        self.assertEqual(len(errors), 1)
        self.assertIn("conflicts with", errors[0])

    def test_oversized_yaml(self) -> None:
        """A document over the size limit is refused before parsing."""
        big = MINIMAL + "x-pad: " + "a" * MAX_SPEC_BYTES + "\n"
        errors = self.errors(big)
        self.assertIn(f"the limit is {MAX_SPEC_BYTES}", errors[0])

    def test_malformed_yaml(self) -> None:
        """Malformed YAML is one error with its line and column."""
        errors = self.errors("name: test\nlisteners:\n  - name: web\n    guest_port: [oops\n")
        self.assertEqual(len(errors), 1)
        self.assertIn("malformed YAML: line", errors[0])

    def test_yaml_bombs_and_tricks(self) -> None:
        """Aliases, deep nesting, duplicate keys, several documents and non-mappings are refused."""
        cases = {
            "a: &x [1, 2]\nb: *x\n": "anchors and aliases",
            "x-deep: " + "[" * 40 + "]" * 40 + "\n": "nested deeper",
            "name: a\nname: b\n": "duplicate key",
            "name: a\n---\nname: b\n": "exactly one YAML document",
            "- a\n- b\n": "must be a mapping",
            "!!python/object:os.system {}\n": "malformed YAML",
        }
        for text, expected in cases.items():
            errors = self.errors(text)
            self.assertIn(expected, errors[0], text)
        self.assertIn("not UTF-8", self.errors(b"name: \xff\xfe\n")[0])

    def test_unknown_and_unenforceable_fields_are_refused(self) -> None:
        """Nothing is silently ignored: unknown fields and fields piccolod cannot enforce fail."""
        errors = self.errors(
            MINIMAL
            + "filesystem: {persistent: true}\n"
            + "resources: {limits: {storage: 1GB, memory: 1KB, cpu: 65}}\n"
            + "permissions: {network: {internet: deny, local_network: allow}}\n"
        )
        joined = "\n".join(errors)
        for expected in (
            "filesystem: unknown field",
            "resources.limits.storage: cannot be enforced",
            "resources.limits.memory: must be at least",
            "resources.limits.cpu: must be a number in (0, 64]",
            "permissions.network.local_network: unknown field",
            "permissions.network.internet: deny cannot be enforced",
        ):
            self.assertIn(expected, joined)

    def test_listener_rules(self) -> None:
        """Flows, protocols, tls with http, remote ports and missing listeners are checked."""
        errors = self.errors(
            "name: web\nimage: a/b:1\nlisteners:\n"
            "  - {name: a, guest_port: 1, flow: udp, protocol: ftp}\n"
            "  - {name: b, guest_port: 2, flow: tls, protocol: http}\n"
            "  - {name: c, guest_port: 3, remote_ports: [0]}\n"
            "  - {name: '9x', guest_port: 4, extra: 1}\n"
            "  - 5\n"
        )
        joined = "\n".join(errors)
        for expected in (
            "listeners[0].flow: must be one of tcp, tls",
            "listeners[0].protocol: must be one of raw, http, websocket",
            "listeners[1].protocol: a tls flow is passed through untouched",
            "listeners[2].remote_ports[0]: must be an integer",
            "listeners[3].extra: unknown field",
            "listeners[3].name: must match",
            "listeners[4]: must be a mapping",
        ):
            self.assertIn(expected, joined)
        self.assertEqual(
            self.errors("name: w1\nimage: a\nlisteners: []\n"),
            ["listeners: must be a non-empty list"],
        )

    def test_build_rules(self) -> None:
        """Inline builds are accepted; git builds and contexts are refused."""
        spec = parse_spec(
            "name: web\nbuild:\n  containerfile: 'FROM localhost/base:1'\n"
            "  build_args: {V: 1}\nlisteners: [{name: h, guest_port: 80}]\n"
        )
        assert spec.build is not None
        self.assertEqual(spec.build.build_args, (("V", "1"),))
        self.assertTrue(spec.image_ref().startswith("localhost/piccolod-web:"))
        errors = self.errors(
            "name: web\nbuild: {git: 'https://example.invalid/x', context: .}\n"
            "listeners: [{name: h, guest_port: 80}]\n"
        )
        joined = "\n".join(errors)
        self.assertIn("build.git: git builds are not supported", joined)
        self.assertIn("build.context: build contexts are not supported", joined)
        self.assertIn("build.containerfile: is required", joined)

    def test_environment_healthcheck_and_dependencies(self) -> None:
        """Bad variable names and values, healthchecks without http listeners, self-dependencies."""
        errors = self.errors(
            MINIMAL
            + "environment: {'1BAD': x, OK: [1]}\n"
            + "healthcheck: {http: {path: nope, interval: 0}}\n"
            + "depends_on: [web, Bad, db, db]\n"
        )
        joined = "\n".join(errors)
        for expected in (
            "environment.1BAD: variable names must match",
            "environment.OK: must be a string, number or boolean",
            "healthcheck.http.path: must be an absolute URL path",
            "healthcheck.http.listener: no http listener to probe",
            "healthcheck.http.interval: must be seconds",
            "depends_on[0]: an app cannot depend on itself",
            "depends_on[1]: 'Bad' is not a valid app name",
            "depends_on[3]: 'db' is listed twice",
        ):
            self.assertIn(expected, joined)

    def test_volume_ids_fit_persistence_rules(self) -> None:
        """The longest app and volume names still make a valid persistence volume id."""
        volume_id = app_volume_id("a" * 50, "v" * 8)
        self.assertLessEqual(len(volume_id), 63)
        self.assertRegex(volume_id, r"^[a-z0-9][a-z0-9-]{0,62}$")
