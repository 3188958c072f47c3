// Placeholder: the per-ISA inner loops of the flow ops go here (included by isa_*.cpp).
