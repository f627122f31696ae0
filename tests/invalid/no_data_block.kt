# no_data_block.kt: nothing says what to train on
# expect: E310
graph no_data_block
node a : cnn_tiny [target]
label -> a : through
