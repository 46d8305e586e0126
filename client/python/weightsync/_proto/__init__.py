"""Generated protocol modules (see weightsync._protogen)."""
