//! Loading the test guest: ELF segments, GDT, page tables and the parameter block.
