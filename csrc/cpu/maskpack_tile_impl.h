// Placeholder: the per-ISA inner loops of the maskpack ops go here (included by isa_*.cpp).
