"""The end-to-end demo: real cloud-server and device-agent processes on loopback."""
