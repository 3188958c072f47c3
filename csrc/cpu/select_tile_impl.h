// Placeholder: the per-ISA inner loops of the select ops go here (included by isa_*.cpp).
