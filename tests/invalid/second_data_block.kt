# second_data_block.kt: one data block per file
# expect: E309
graph second_data_block
data digits { val_split = 300 }
data cifar10 { val_split = 5000 }
node a : cnn_tiny [target]
label -> a : through
