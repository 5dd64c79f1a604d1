"""The SDK against a running server named by UPSTREAM_URL; skipped without one."""

import os
import time
import unittest

from upstream_sdk import Client, UpstreamError

URL = os.environ.get("UPSTREAM_URL")


@unittest.skipUnless(URL, "UPSTREAM_URL is not set; start `upstream serve` and set it")
class SandboxTest(unittest.TestCase):
    def setUp(self) -> None:
        self.client = Client(URL, api_key=os.environ.get("UPSTREAM_API_KEY"))

    def test_three_call_flow(self) -> None:
        sandbox = self.client.create_sandbox(metadata={"sdk": "python"})
        result = sandbox.exec(["echo", "hello"])
        sandbox.destroy()

        self.assertEqual(result.exit_code, 0)
        self.assertEqual(result.stdout, b"hello\n")
        with self.assertRaises(UpstreamError) as caught:
            self.client.get_sandbox(sandbox.id)
        self.assertEqual(caught.exception.status, 404)
        self.assertEqual(caught.exception.code, "sandbox_not_found")

    def test_stream_files_and_errors(self) -> None:
        with self.client.create_sandbox() as sandbox:
            started = time.monotonic()
            arrivals = []
            exit_info = None
            for event in sandbox.exec_stream(["sh", "-c", "echo one; sleep 1.5; echo two"]):
                if event.type == "stdout":
                    arrivals.append((time.monotonic() - started, event.data))
                elif event.type == "exit":
                    exit_info = event.exit
            self.assertEqual(b"".join(data for _, data in arrivals), b"one\ntwo\n")
            self.assertEqual(exit_info["exit_code"], 0)
            self.assertLess(arrivals[0][0] + 1.0, arrivals[-1][0])

            payload = bytes(range(256)) * 4096
            self.assertEqual(sandbox.write_file("/tmp/blob", payload, mode=0o600), len(payload))
            self.assertEqual(sandbox.read_file("/tmp/blob"), payload)
            names = [entry["name"] for entry in sandbox.list_files("/tmp")]
            self.assertIn("blob", names)

            binary = sandbox.exec(["cat"], stdin=b"\xff\x00\xfe")
            self.assertEqual(binary.stdout, b"\xff\x00\xfe")

            with self.assertRaises(UpstreamError) as caught:
                sandbox.exec(["no-such-program"])
            self.assertEqual(caught.exception.status, 422)
            self.assertEqual(caught.exception.code, "command_not_found")

            background = sandbox.exec_background(["no-such-program"])
            deadline = time.monotonic() + 20
            result = sandbox.process(background.id)
            while result.running and time.monotonic() < deadline:
                time.sleep(0.1)
                result = sandbox.process(background.id)
            self.assertEqual(result.state, "failed")
            self.assertIsNone(result.exit_code)
            self.assertEqual(result.error["code"], "command_not_found")

            with self.assertRaises(UpstreamError) as caught:
                self.client.create_sandbox(vcpus=0)
            self.assertEqual(caught.exception.status, 400)
            self.assertEqual(caught.exception.field, "vcpus")


if __name__ == "__main__":
    unittest.main()
