"""How dmrx writes what it makes: atomic files and directories, strict JSON, manifests with hashes."""
