"""verl platform plugins (the CPU platform for development machines and CI)."""
