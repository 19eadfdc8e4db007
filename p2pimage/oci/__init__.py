"""The registry side: an OCI distribution client, image building, registry notifications."""
