# syntax_setting_outside_block.kt: a setting written outside any block
# expect: E100
graph syntax_setting_outside_block
data digits { val_split = 300 }
epochs = 8
node a : cnn_tiny [target]
label -> a : through
