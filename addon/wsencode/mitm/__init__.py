"""What the addon does with mitmproxy's public interfaces (flows, options,
commands, hooks), on behalf of the addon class: reading a flow in the core's
terms, the options, the commands, the bundles."""
