module kapbench

go 1.19
