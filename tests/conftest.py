pytest_plugins = ["sshfixtures"]
