"""YAML + key=value overrides -> Plan (LlamaFactory args + the appliance's own settings)."""
